"""RetrievalSSR against the plain-loop oracle (tests/model/oracle.py)."""

from __future__ import annotations

import oracle  # tests/model is put on sys.path by pytest (rootdir-less "prepend" import mode)
import pytest
import torch

from ssr_model.losses import info_bce
from ssr_model.retrieval import RetrievalSSR, retrieval_dni_input_dim
from ssr_model.subgraph import retrieval_pair_positions, retrieval_subgraph_vectors

D = 12
HIDDEN = 32
LR = 5e-2
DTYPE = torch.float64


# (k, steps)
SHAPES = [(5, 1), (20, 2), (64, 4), (100, 3), (300, 1)]


def make_model(k: int, steps: int, seed: int = 0) -> RetrievalSSR:
    torch.manual_seed(seed)
    model = RetrievalSSR(D, k, steps, lr_dni=LR, hidden=HIDDEN, dtype=DTYPE)
    with torch.no_grad():
        for dni in (model.dni_query, model.dni_database):
            for norm in (dni.layer1[0], dni.layer1[3], dni.layer2[2]):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)
    return model


def make_batch(B: int, k: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, D, generator=gen, dtype=DTYPE)
    neighbours = torch.randn(B, k, D, generator=gen, dtype=DTYPE)
    positives = torch.rand(B, k, generator=gen) < 0.3
    positives[:, 0] = True
    return query, neighbours, positives


@pytest.mark.parametrize("k", [1, 5, 100])
def test_pair_positions(k):
    rows, cols = retrieval_pair_positions(k)
    assert rows.shape == (retrieval_dni_input_dim(k),) == (2 * k + 1,)
    expected = [(i, j) for i in range(k + 2) for j in range(i + 1, k + 2) if not (i >= 2 and j >= 2)]
    assert list(zip(rows.tolist(), cols.tolist())) == expected
    assert retrieval_dni_input_dim(100) == 201


@pytest.mark.parametrize("k", [1, 7, 50])
def test_subgraph_vectors_match_oracle(k):
    query, neighbours, _ = make_batch(2, k)
    rows, cols = retrieval_pair_positions(k)
    vectors = retrieval_subgraph_vectors(query, neighbours, rows, cols)
    assert vectors.shape == (2, 1 + k, 2 * k + 1)
    for b in range(2):
        expected = oracle.retrieval_vectors(query[b], neighbours[b])
        torch.testing.assert_close(vectors[b], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,steps", SHAPES)
def test_matches_oracle_all_steps(k, steps):
    model = make_model(k, steps)
    query, neighbours, _ = make_batch(2, k)
    with torch.no_grad():
        batched = model(query, neighbours, return_all_steps=True)  # (steps + 1, B, k)
    assert batched.shape == (steps + 1, 2, k)
    for b in range(2):
        expected = oracle.retrieval_query(model, query[b], neighbours[b])
        for t in range(steps + 1):
            torch.testing.assert_close(batched[t, b], expected[t].detach(), rtol=1e-9, atol=1e-9)
    assert (batched[-1] - batched[0]).abs().max() > 1e-4


@pytest.mark.parametrize("k,steps", SHAPES[:4])
def test_batched_equals_single_query(k, steps):
    model = make_model(k, steps)
    query, neighbours, _ = make_batch(3, k)
    with torch.no_grad():
        batched = model(query, neighbours)
        assert batched.shape == (3, k)
        for b in range(3):
            single = model(query[b], neighbours[b])
            assert single.shape == (k,)
            torch.testing.assert_close(single, batched[b], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,steps", [(5, 1), (20, 2), (40, 3)])
def test_gradients_match_oracle(k, steps):
    model = make_model(k, steps)
    model.train()
    query, neighbours, positives = make_batch(2, k)
    neighbours.requires_grad_(True)
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    sims = model(query, neighbours)
    loss = info_bce(sims, positives, model.scale_cls)
    grads = torch.autograd.grad(loss, params + [neighbours])

    per_query = [
        oracle.info_bce(oracle.retrieval_query(model, query[b], neighbours[b])[-1], positives[b], model.scale_cls[0])
        for b in range(2)
    ]
    loss_ref = sum(per_query) / 2
    grads_ref = torch.autograd.grad(loss_ref, params + [neighbours])

    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
    for name, g, g_ref in zip(names + ["neighbours"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert grads[names.index("dni_query.layer1.1.weight")].abs().max() > 0
    assert grads[names.index("dni_database.layer1.1.weight")].abs().max() > 0


def test_inference_equals_training_and_keeps_no_graph():
    model = make_model(30, 3)
    query, neighbours, _ = make_batch(2, 30)
    query.requires_grad_(True)

    model.train()
    trained = model(query, neighbours)
    assert trained.grad_fn is not None

    with torch.no_grad():
        no_grad_out = model(query, neighbours)
    assert no_grad_out.grad_fn is None and not no_grad_out.requires_grad

    model.eval()
    eval_out = model(query, neighbours)
    assert eval_out.grad_fn is None and not eval_out.requires_grad  # no scale in the output

    torch.testing.assert_close(no_grad_out, trained.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eval_out, trained.detach(), rtol=1e-10, atol=1e-10)


def test_state_dict_round_trip():
    model = make_model(10, 2)
    state = model.state_dict()
    prefixes = ("dni_query", "dni_database")
    dni_keys = (
        "layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
        "layer1.3.weight", "layer1.3.bias", "layer2.0.weight", "layer2.0.bias",
        "layer2.2.weight", "layer2.2.bias", "layer3.weight", "layer3.bias",
    )  # fmt: skip
    assert set(state) == {"scale_cls"} | {f"{p}.{k}" for p in prefixes for k in dni_keys}
    assert state["scale_cls"].shape == (1,)
    assert state["dni_database.layer3.weight"].shape == (21, HIDDEN)

    fresh = RetrievalSSR(D, 10, 2, lr_dni=LR, hidden=HIDDEN, dtype=DTYPE)
    fresh.load_state_dict(state, strict=True)
    query, neighbours, _ = make_batch(2, 10)
    with torch.no_grad():
        assert torch.equal(fresh(query, neighbours), model(query, neighbours))


def test_rejects_wrong_k():
    model = RetrievalSSR(D, 10, 1, hidden=HIDDEN)
    with pytest.raises(ValueError, match="k=10"):
        model(torch.randn(D), torch.randn(9, D))
