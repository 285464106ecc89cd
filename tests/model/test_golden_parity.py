"""Parity with the authors' SSR code (few-shot and retrieval ``ssr.py``), float64.

``data/ssr_golden.npz`` (copied from shared/reference, described in its README) holds, for
random weights moved off their init and random inputs, what the authors' code computes:
eval-mode outputs, the train-mode loss and its gradient w.r.t. every parameter. The
state dicts use the authors' key names and load strictly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssr_model.fewshot import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy, info_bce
from ssr_model.retrieval import RetrievalSSR

GOLDEN = Path(__file__).parent / "data" / "ssr_golden.npz"
TOL = 1e-9
FEWSHOT_CASES = [f"fewshot{i}" for i in range(4)]
RETRIEVAL_CASES = [f"retrieval{i}" for i in range(3)]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as archive:
        return {key: archive[key] for key in archive.files}


def tensor(golden: dict[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(golden[key].copy())


def load_state(model: torch.nn.Module, golden: dict[str, np.ndarray], case: str) -> None:
    prefix = f"{case}/state/"
    state = {key[len(prefix):]: tensor(golden, key) for key in golden if key.startswith(prefix)}
    model.load_state_dict(state, strict=True)


def assert_gradients(model: torch.nn.Module, loss: torch.Tensor, golden: dict[str, np.ndarray], case: str) -> None:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params)
    expected_names = {key[len(f"{case}/grad/"):] for key in golden if key.startswith(f"{case}/grad/")}
    assert set(names) == expected_names
    for name, grad in zip(names, grads):
        torch.testing.assert_close(
            grad, tensor(golden, f"{case}/grad/{name}"), rtol=0, atol=TOL, msg=lambda m: f"{case} {name}: {m}"
        )


def fewshot_model(golden, case: str) -> FewShotSSR:
    n_way, _, n_query, steps, feat_dim, hidden = golden[f"{case}/config"].tolist()
    model = FewShotSSR(
        feat_dim, n_way, n_query, steps, lr_dni=float(golden[f"{case}/lr_dni"]), hidden=hidden, dtype=torch.float64
    )
    load_state(model, golden, case)
    return model


def retrieval_model(golden, case: str) -> RetrievalSSR:
    k, steps, feat_dim, hidden = golden[f"{case}/config"].tolist()
    model = RetrievalSSR(feat_dim, k, steps, lr_dni=float(golden[f"{case}/lr_dni"]), hidden=hidden, dtype=torch.float64)
    load_state(model, golden, case)
    return model


@pytest.mark.parametrize("case", FEWSHOT_CASES)
def test_fewshot_eval_scores(golden, case):
    model = fewshot_model(golden, case).eval()
    support, query = tensor(golden, f"{case}/support"), tensor(golden, f"{case}/query")
    expected = tensor(golden, f"{case}/scores")
    torch.testing.assert_close(model(support, query), expected, rtol=0, atol=TOL)  # grad enabled
    with torch.no_grad():
        torch.testing.assert_close(model(support, query), expected, rtol=0, atol=TOL)
        batched = model(torch.stack([support, support]), torch.stack([query, query]))
    torch.testing.assert_close(batched, torch.stack([expected, expected]), rtol=0, atol=TOL)


@pytest.mark.parametrize("case", FEWSHOT_CASES)
@pytest.mark.parametrize("inputs_require_grad", [True, False], ids=["inputs-grad", "inputs-plain"])
def test_fewshot_train_loss_and_gradients(golden, case, inputs_require_grad):
    model = fewshot_model(golden, case).train()
    support = tensor(golden, f"{case}/support").requires_grad_(inputs_require_grad)
    query = tensor(golden, f"{case}/query").requires_grad_(inputs_require_grad)
    scores = model(support, query)
    torch.testing.assert_close(scores.detach(), tensor(golden, f"{case}/scores"), rtol=0, atol=TOL)
    loss = fewshot_cross_entropy(scores, tensor(golden, f"{case}/labels"))
    assert abs(loss.item() - float(golden[f"{case}/loss"])) < TOL
    assert_gradients(model, loss, golden, case)


@pytest.mark.parametrize("case", RETRIEVAL_CASES)
def test_retrieval_eval_similarities(golden, case):
    model = retrieval_model(golden, case).eval()
    query, database = tensor(golden, f"{case}/query"), tensor(golden, f"{case}/database")
    expected = tensor(golden, f"{case}/scores")
    torch.testing.assert_close(model(query, database), expected, rtol=0, atol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(query, database), expected, rtol=0, atol=TOL)
        batched = model(torch.stack([query, query]), torch.stack([database, database]))
    torch.testing.assert_close(batched, torch.stack([expected, expected]), rtol=0, atol=TOL)


@pytest.mark.parametrize("case", RETRIEVAL_CASES)
@pytest.mark.parametrize("inputs_require_grad", [True, False], ids=["inputs-grad", "inputs-plain"])
def test_retrieval_train_loss_and_gradients(golden, case, inputs_require_grad):
    model = retrieval_model(golden, case).train()
    query = tensor(golden, f"{case}/query").requires_grad_(inputs_require_grad)
    database = tensor(golden, f"{case}/database").requires_grad_(inputs_require_grad)
    sims = model(query, database)
    torch.testing.assert_close(sims.detach(), tensor(golden, f"{case}/scores"), rtol=0, atol=TOL)
    loss = info_bce(sims, tensor(golden, f"{case}/labels") > 0, model.scale_cls)
    assert abs(loss.item() - float(golden[f"{case}/loss"])) < TOL
    assert_gradients(model, loss, golden, case)
