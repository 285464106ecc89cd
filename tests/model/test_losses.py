"""Losses of ssr_model.losses against literal formulas (tests/model/oracle.py)."""

from __future__ import annotations

import oracle  # tests/model is put on sys.path by pytest (rootdir-less "prepend" import mode)
import torch

from ssr_model.losses import fewshot_cross_entropy, info_bce


def test_fewshot_cross_entropy_batched_and_single():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 7), generator=gen)
    expected = sum(oracle.fewshot_cross_entropy(scores[e], labels[e]) for e in range(3)) / 3
    torch.testing.assert_close(fewshot_cross_entropy(scores, labels), expected)
    torch.testing.assert_close(
        fewshot_cross_entropy(scores[1], labels[1]), oracle.fewshot_cross_entropy(scores[1], labels[1])
    )


def test_info_bce_matches_literal_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 9, generator=gen, dtype=torch.float64) * 2 - 1
    positives = torch.rand(4, 9, generator=gen) < 0.4
    positives[:, 0] = True
    positives[2] = False  # a row without positives contributes nothing
    positives[3] = True  # a row without negatives: loss 0 for each positive
    x.requires_grad_(True)
    loss = info_bce(x, positives, 10.0)
    rows = [oracle.info_bce(x[b], positives[b], 10.0) for b in range(4)]
    expected = sum(r for r in rows if r is not None) / sum(r is not None for r in rows)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(rows[3], torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g, g_ref)
    assert torch.isfinite(g).all()


def test_info_bce_single_query_and_tensor_scale():
    x = torch.tensor([0.9, 0.2, 0.5, -0.1], dtype=torch.float64)
    positives = torch.tensor([True, False, True, False])
    scale = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    loss = info_bce(x, positives, scale)
    torch.testing.assert_close(loss, oracle.info_bce(x, positives, scale[0]))
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all()


def test_info_bce_is_stable_for_large_scale():
    x = torch.tensor([[1.0, 0.99, -1.0, 0.5]], requires_grad=True)
    positives = torch.tensor([[False, True, False, False]])
    loss = info_bce(x, positives, 1000.0)
    # -log(e^{990} / (e^{990} + e^{1000} + ...)) ~= 10
    torch.testing.assert_close(loss, torch.tensor(10.0), atol=1e-3, rtol=0)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_info_bce_no_positive_at_all_is_zero_with_grad():
    x = torch.randn(3, 5, requires_grad=True)
    loss = info_bce(x, torch.zeros(3, 5, dtype=torch.bool), 10.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
