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
CASES = [f"fewshot{i}" for i in range(4)] + [f"retrieval{i}" for i in range(3)]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as archive:
        return {key: archive[key] for key in archive.files}


def tensor(golden: dict[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(golden[key].copy())


def load_state(model: torch.nn.Module, golden: dict[str, np.ndarray], case: str) -> None:
    prefix = f"{case}/state/"
    state = {key[len(prefix) :]: tensor(golden, key) for key in golden if key.startswith(prefix)}
    model.load_state_dict(state, strict=True)


def assert_gradients(model: torch.nn.Module, loss: torch.Tensor, golden: dict[str, np.ndarray], case: str) -> None:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params)
    expected_names = {key[len(f"{case}/grad/") :] for key in golden if key.startswith(f"{case}/grad/")}
    assert set(names) == expected_names
    for name, grad in zip(names, grads):
        torch.testing.assert_close(
            grad, tensor(golden, f"{case}/grad/{name}"), rtol=0, atol=TOL, msg=lambda m: f"{case} {name}: {m}"
        )


def fewshot_case(golden, case: str):
    """(model, the two inputs, loss of the output) of a few-shot case."""
    n_way, _, n_query, steps, feat_dim, hidden = golden[f"{case}/config"].tolist()
    model = FewShotSSR(
        feat_dim, n_way, n_query, steps, lr_dni=float(golden[f"{case}/lr_dni"]), hidden=hidden, dtype=torch.float64
    )
    inputs = tensor(golden, f"{case}/support"), tensor(golden, f"{case}/query")
    labels = tensor(golden, f"{case}/labels")
    return model, inputs, lambda scores: fewshot_cross_entropy(scores, labels)


def retrieval_case(golden, case: str):
    """(model, the two inputs, loss of the output) of a retrieval case."""
    k, steps, feat_dim, hidden = golden[f"{case}/config"].tolist()
    model = RetrievalSSR(feat_dim, k, steps, lr_dni=float(golden[f"{case}/lr_dni"]), hidden=hidden, dtype=torch.float64)
    inputs = tensor(golden, f"{case}/query"), tensor(golden, f"{case}/database")
    positives = tensor(golden, f"{case}/labels") > 0
    return model, inputs, lambda sims: info_bce(sims, positives, model.scale_cls)


def load_case(golden, case: str):
    model, inputs, loss = (fewshot_case if case.startswith("fewshot") else retrieval_case)(golden, case)
    load_state(model, golden, case)
    return model, inputs, loss


@pytest.mark.parametrize("case", CASES)
def test_eval_outputs(golden, case):
    """Eval mode with grad enabled, under no_grad, and in a batch of two copies."""
    model, (first, second), _ = load_case(golden, case)
    model.eval()
    expected = tensor(golden, f"{case}/scores")
    torch.testing.assert_close(model(first, second), expected, rtol=0, atol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(first, second), expected, rtol=0, atol=TOL)
        batched = model(torch.stack([first, first]), torch.stack([second, second]))
    torch.testing.assert_close(batched, torch.stack([expected, expected]), rtol=0, atol=TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("inputs_require_grad", [True, False], ids=["inputs-grad", "inputs-plain"])
def test_train_loss_and_gradients(golden, case, inputs_require_grad):
    """Train mode: outputs, the loss and the gradient of every parameter (the authors'
    training code gives its features requires_grad; plain features must give the same)."""
    model, (first, second), loss_of = load_case(golden, case)
    model.train()
    out = model(first.requires_grad_(inputs_require_grad), second.requires_grad_(inputs_require_grad))
    torch.testing.assert_close(out.detach(), tensor(golden, f"{case}/scores"), rtol=0, atol=TOL)
    loss = loss_of(out)
    assert abs(loss.item() - float(golden[f"{case}/loss"])) < TOL
    assert_gradients(model, loss, golden, case)
