"""FewShotSSR and DNI against the plain-loop oracle (tests/model/oracle.py)."""

from __future__ import annotations

import oracle  # tests/model is put on sys.path by pytest (rootdir-less "prepend" import mode)
import pytest
import torch
from torch import nn

from ssr_model.dni import DNI
from ssr_model.fewshot import FewShotSSR, fewshot_dni_input_dim
from ssr_model.losses import fewshot_cross_entropy
from ssr_model.subgraph import fewshot_pair_positions, fewshot_subgraph_vectors

D = 12
HIDDEN = 32
LR = 1e-2  # large enough that refinement visibly moves the scores at D = 12
DTYPE = torch.float64


# (n_way, n_shot, n_query, steps)
SHAPES = [
    (2, 1, 1, 1),
    (3, 5, 4, 2),
    (5, 1, 15, 3),
    (10, 5, 20, 4),
    (5, 5, 75, 1),
]


def make_model(n_way: int, n_query: int, steps: int, seed: int = 0) -> FewShotSSR:
    torch.manual_seed(seed)
    model = FewShotSSR(D, n_way, n_query, steps, lr_dni=LR, hidden=HIDDEN, dtype=DTYPE)
    # Non-trivial instance-norm affine parameters, so they are exercised too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".0.weight", ".3.weight", ".2.weight")) and param.numel() == 1:
                param.uniform_(0.5, 1.5)
            elif param.numel() == 1 and name != "scale_cls":
                param.uniform_(-0.2, 0.2)
    return model


def make_episodes(E: int, n_way: int, n_shot: int, n_query: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(E, n_way, n_shot, D, generator=gen, dtype=DTYPE)
    query = torch.randn(E, n_query, D, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, n_way, (E, n_query), generator=gen)
    return support, query, labels


def test_dni_matches_authors_module_path():
    torch.manual_seed(0)
    dni = DNI(7, 16, dtype=DTYPE)
    with torch.no_grad():
        for norm in (dni.layer1[0], dni.layer1[3], dni.layer2[2]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 7, dtype=DTYPE)
    # The authors' forward: rows as (N, 1, d) through the Sequential containers.
    expected = dni.layer3(dni.layer2(dni.layer1(x.reshape(-1, 1, 7)))).reshape(3, 5, 7)
    torch.testing.assert_close(dni(x), expected, rtol=0, atol=1e-12)
    # Row independence.
    torch.testing.assert_close(dni(x[1, 2]), expected[1, 2], rtol=0, atol=1e-12)
    params = dict(dni.named_parameters())
    torch.testing.assert_close(oracle.dni_row(params, x[0, 0]), expected[0, 0], rtol=0, atol=1e-12)


def test_dni_state_dict_keys():
    assert set(DNI(5, 8).state_dict()) == {
        "layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
        "layer1.3.weight", "layer1.3.bias", "layer2.0.weight", "layer2.0.bias",
        "layer2.2.weight", "layer2.2.bias", "layer3.weight", "layer3.bias",
    }  # fmt: skip


@pytest.mark.parametrize("n_way,n_query", [(5, 75), (2, 1), (10, 3)])
def test_pair_positions(n_way, n_query):
    rows, cols = fewshot_pair_positions(n_way, n_query)
    d_in = fewshot_dni_input_dim(n_way, n_query)
    assert rows.shape == cols.shape == (d_in,)
    assert d_in == oracle.expected_fewshot_d_in(n_way, n_query)
    assert fewshot_dni_input_dim(5, 75) == 465
    expected = [
        (i, j)
        for i in range(1 + n_way + n_query)
        for j in range(i + 1, 1 + n_way + n_query)
        if not (i > n_way and j > n_way)
    ]
    assert list(zip(rows.tolist(), cols.tolist())) == expected


@pytest.mark.parametrize("n_way,n_query", [(2, 1), (5, 15), (10, 30)])
def test_subgraph_vectors_match_oracle(n_way, n_query):
    support, query, _ = make_episodes(2, n_way, 1, n_query)
    rows, cols = fewshot_pair_positions(n_way, n_query)
    vectors = fewshot_subgraph_vectors(support.mean(2), query, rows, cols)
    assert vectors.shape == (2, n_way + n_query, fewshot_dni_input_dim(n_way, n_query))
    for e in range(2):
        expected = oracle.fewshot_vectors(support[e].mean(1), query[e])
        torch.testing.assert_close(vectors[e], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_way,n_shot,n_query,steps", SHAPES)
def test_matches_oracle_all_steps(n_way, n_shot, n_query, steps):
    model = make_model(n_way, n_query, steps)
    support, query, _ = make_episodes(2, n_way, n_shot, n_query)
    with torch.no_grad():
        batched = model(support, query, return_all_steps=True)  # (steps + 1, E, n_query, n_way)
    assert batched.shape == (steps + 1, 2, n_query, n_way)
    for e in range(2):
        expected = oracle.fewshot_episode(model, support[e], query[e])
        for t in range(steps + 1):
            torch.testing.assert_close(batched[t, e], expected[t].detach(), rtol=1e-9, atol=1e-9)
    # The refinement is not a no-op at this learning rate.
    assert (batched[-1] - batched[0]).abs().max() > 1e-3


@pytest.mark.parametrize("n_way,n_shot,n_query,steps", SHAPES)
def test_batched_equals_single_episode(n_way, n_shot, n_query, steps):
    model = make_model(n_way, n_query, steps)
    support, query, _ = make_episodes(3, n_way, n_shot, n_query)
    with torch.no_grad():
        batched = model(support, query)
        assert batched.shape == (3, n_query, n_way)
        for e in range(3):
            single = model(support[e], query[e])
            assert single.shape == (n_query, n_way)
            torch.testing.assert_close(single, batched[e], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_way,n_shot,n_query,steps", [SHAPES[1], SHAPES[2], SHAPES[3]])
def test_gradients_match_oracle(n_way, n_shot, n_query, steps):
    model = make_model(n_way, n_query, steps)
    model.train()
    support, query, labels = make_episodes(2, n_way, n_shot, n_query)
    support.requires_grad_(True)
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    scores = model(support, query)
    assert scores.requires_grad
    loss = fewshot_cross_entropy(scores, labels)
    grads = torch.autograd.grad(loss, params + [support])

    loss_ref = (
        sum(
            oracle.fewshot_cross_entropy(oracle.fewshot_episode(model, support[e], query[e])[-1], labels[e])
            for e in range(2)
        )
        / 2
    )
    grads_ref = torch.autograd.grad(loss_ref, params + [support])

    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
    for name, g, g_ref in zip(names + ["support"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # Second-order terms reach the first DNI layer.
    assert grads[names.index("dni_support.layer1.1.weight")].abs().max() > 0
    assert grads[names.index("dni_query.layer3.weight")].abs().max() > 0


def test_inference_equals_training_and_keeps_no_graph():
    n_way, n_shot, n_query, steps = 5, 1, 15, 3
    model = make_model(n_way, n_query, steps)
    support, query, _ = make_episodes(2, n_way, n_shot, n_query)
    support.requires_grad_(True)

    model.train()
    trained = model(support, query)
    assert trained.grad_fn is not None

    with torch.no_grad():
        no_grad_out = model(support, query)
    assert no_grad_out.grad_fn is None and not no_grad_out.requires_grad

    model.eval()
    eval_out = model(support, query)  # grad enabled, eval mode: inference, detached
    assert eval_out.grad_fn is None and not eval_out.requires_grad

    with torch.inference_mode():
        inference_out = model(support.detach() * 1.0, query * 1.0)  # inference tensors in
    assert not inference_out.requires_grad

    torch.testing.assert_close(no_grad_out, trained.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eval_out.detach(), trained.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inference_out.clone(), trained.detach(), rtol=1e-10, atol=1e-10)


def make_mixed_episodes(n_way: int, n_shot: int, n_query: int):
    """Four episodes of different character in one batch: plain Gaussian, scaled by 100,
    queries clustered around their class's support, and one with a zero query."""
    support, query, labels = make_episodes(4, n_way, n_shot, n_query, seed=7)
    support[1] *= 100.0
    query[1] *= 100.0
    gen = torch.Generator().manual_seed(8)
    query[2] = support[2].mean(1)[labels[2]] + 0.3 * torch.randn(n_query, D, generator=gen, dtype=DTYPE)
    query[3, 0] = 0.0
    return support, query, labels


@pytest.mark.parametrize("n_way,n_shot,n_query,steps", [(3, 2, 6, 2), (5, 1, 15, 3)])
def test_mixed_batch_matches_oracle(n_way, n_shot, n_query, steps):
    """A batch of unlike episodes: each equals the one-episode oracle, values and gradients
    (episodes never interact through the batched autograd calls)."""
    model = make_model(n_way, n_query, steps)
    support, query, labels = make_mixed_episodes(n_way, n_shot, n_query)
    with torch.no_grad():
        inferred = model(support, query)
    model.train()
    params = list(model.parameters())
    scores = model(support, query)
    torch.testing.assert_close(scores.detach(), inferred, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(fewshot_cross_entropy(scores, labels), params)
    expected = [oracle.fewshot_episode(model, support[e], query[e])[-1] for e in range(4)]
    for e in range(4):
        torch.testing.assert_close(inferred[e], expected[e].detach(), rtol=1e-9, atol=1e-9)
    loss_ref = sum(oracle.fewshot_cross_entropy(expected[e], labels[e]) for e in range(4)) / 4
    for g, g_ref in zip(grads, torch.autograd.grad(loss_ref, params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9)


def test_total_derivative_differs_from_partial():
    """The cross path Q -> P_new -> X changes the scores: a version whose query update holds
    the prototypes fixed (the old, wrong reading) disagrees with the model."""
    model = make_model(5, 15, 2)
    support, query, _ = make_episodes(1, 5, 1, 15)
    P, Q = support[0].mean(1), query[0]
    p_sup = dict(model.dni_support.named_parameters())
    p_qry = dict(model.dni_query.named_parameters())
    for _ in range(model.steps):
        leaf = P.detach().requires_grad_(True)
        P = oracle.dni_step(leaf, oracle.fewshot_vectors(leaf, Q.detach()), p_sup, LR)
        leaf = Q.detach().requires_grad_(True)
        Q = oracle.dni_step(leaf, oracle.fewshot_vectors(P.detach(), leaf), p_qry, LR)
    partial = model.scale_cls * (oracle.unit_rows(Q) @ oracle.unit_rows(P).T)
    with torch.no_grad():
        total = model(support[0], query[0])
    assert (total - partial.detach()).abs().max() > 1e-3


def test_float32_matches_float64():
    model = make_model(5, 15, 2)
    support, query, _ = make_episodes(2, 5, 1, 15)
    with torch.no_grad():
        out64 = model(support, query)
        out32 = model.float()(support.float(), query.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip():
    model = make_model(5, 15, 2)
    state = model.state_dict()
    prefixes = ("dni_support", "dni_query")
    dni_keys = (
        "layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
        "layer1.3.weight", "layer1.3.bias", "layer2.0.weight", "layer2.0.bias",
        "layer2.2.weight", "layer2.2.bias", "layer3.weight", "layer3.bias",
    )  # fmt: skip
    assert set(state) == {"scale_cls"} | {f"{p}.{k}" for p in prefixes for k in dni_keys}
    assert state["scale_cls"].shape == (1,)
    assert state["dni_support.layer1.1.weight"].shape == (HIDDEN, 105)  # M = 20: 21 * 20 / 2 - 15 * 14 / 2
    assert torch.equal(FewShotSSR(D, 5, 15, 1).scale_cls, torch.tensor([10.0]))

    fresh = FewShotSSR(D, 5, 15, 2, lr_dni=LR, hidden=HIDDEN, dtype=DTYPE)
    fresh.load_state_dict(state, strict=True)
    support, query, _ = make_episodes(2, 5, 1, 15)
    with torch.no_grad():
        assert torch.equal(fresh(support, query), model(support, query))


def test_steps_is_mutable_and_return_all_steps_consistent():
    model = make_model(3, 6, 1)
    support, query, _ = make_episodes(1, 3, 1, 6)
    with torch.no_grad():
        model.steps = 3
        all_steps = model(support[0], query[0], return_all_steps=True)
        assert all_steps.shape == (4, 6, 3)
        torch.testing.assert_close(all_steps[-1], model(support[0], query[0]), rtol=0, atol=0)
        model.steps = 0
        torch.testing.assert_close(all_steps[0], model(support[0], query[0]), rtol=0, atol=0)


def test_rejects_wrong_shapes():
    model = FewShotSSR(D, 5, 15, 1, hidden=HIDDEN)
    with pytest.raises(ValueError, match="n_way=5"):
        model(torch.randn(4, 1, D), torch.randn(15, D))
    with pytest.raises(ValueError, match="n_query=15"):
        model(torch.randn(5, 1, D), torch.randn(14, D))


def test_module_is_plain_torch():
    assert isinstance(make_model(2, 1, 1).dni_query, nn.Module)


def test_zero_feature_stays_finite():
    model = make_model(3, 4, 2)
    support, query, labels = make_episodes(1, 3, 1, 4)
    query[0, 1] = 0.0  # a zero query: its cosines are 0 (eps clamp), its update stays finite
    model.train()
    scores = model(support, query)
    assert torch.isfinite(scores).all()
    fewshot_cross_entropy(scores, labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
