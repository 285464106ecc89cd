import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The model tests' tensors are tiny: one thread avoids OpenMP barrier stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
