import numpy as np
import pytest
import torch

from ssr_model.baselines import fewshot_k_reciprocal, k_reciprocal
from tests.model.k_reciprocal_oracle import k_reciprocal_loop


def _blocks(feats: np.ndarray, n_query: int):
    d = np.sqrt(np.maximum(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1), 0))
    return d[:n_query, n_query:], d[:n_query, :n_query], d[n_query:, n_query:]


@pytest.mark.parametrize(
    "n_query, n_gallery, dim, k1, k2, lam",
    [
        (75, 5, 64, 20, 6, 0.3),  # few-shot episode shape
        (10, 50, 8, 5, 3, 0.5),
        (30, 120, 16, 20, 6, 0.3),
        (5, 40, 4, 10, 1, 0.2),  # no local query expansion
        (3, 4, 2, 20, 6, 0.3),  # k1 + 1 larger than the graph
        (20, 60, 3, 7, 15, 0.8),  # k2 > k1 + 1, odd k1 (rounding of k1 / 2)
    ],
)
def test_matches_loop_oracle(n_query, n_gallery, dim, k1, k2, lam):
    rng = np.random.default_rng(n_query * 1000 + n_gallery)
    blocks = _blocks(rng.standard_normal((n_query + n_gallery, dim)), n_query)
    got = k_reciprocal(*blocks, k1=k1, k2=k2, lambda_value=lam)
    want = k_reciprocal_loop(*blocks, k1=k1, k2=k2, lambda_value=lam)
    assert got.dtype == np.float32 and got.shape == (n_query, n_gallery)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k1, k2", [(5, 3), (10, 5), (20, 6)])
def test_matches_loop_oracle_with_ties(k1, k2):
    # integer grid points: many equal distances, including at the k-th rank boundaries
    rng = np.random.default_rng(k1)
    feats = rng.integers(0, 3, size=(90, 3)).astype(np.float64)
    blocks = _blocks(feats, 15)
    np.testing.assert_allclose(
        k_reciprocal(*blocks, k1=k1, k2=k2), k_reciprocal_loop(*blocks, k1=k1, k2=k2), atol=1e-5, rtol=0
    )


def test_float32_inputs_match():
    rng = np.random.default_rng(3)
    blocks = _blocks(rng.standard_normal((100, 8)).astype(np.float32), 20)
    np.testing.assert_allclose(k_reciprocal(*blocks), k_reciprocal_loop(*blocks), atol=1e-5, rtol=0)


def test_lambda_one_is_normalised_squared_distance():
    rng = np.random.default_rng(4)
    q_g, q_q, g_g = _blocks(rng.standard_normal((30, 5)), 10)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    want = (full / full.max(axis=0)).T[:10, 10:]
    np.testing.assert_allclose(k_reciprocal(q_g, q_q, g_g, lambda_value=1.0), want, rtol=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="q_q_dist"):
        k_reciprocal(np.zeros((3, 4)), np.zeros((2, 2)), np.zeros((4, 4)))


def test_fewshot_numpy_and_torch_agree():
    rng = np.random.default_rng(5)
    protos = rng.standard_normal((5, 32))
    queries = protos[np.repeat(np.arange(5), 15)] + 0.3 * rng.standard_normal((75, 32))
    dist = fewshot_k_reciprocal(protos, queries, k1=20, k2=6, lambda_value=0.3)
    assert dist.shape == (75, 5) and dist.dtype == np.float32
    assert (dist.argmin(1) == np.repeat(np.arange(5), 15)).mean() > 0.9
    t = fewshot_k_reciprocal(torch.from_numpy(protos), torch.from_numpy(queries), 20, 6, 0.3)
    assert isinstance(t, torch.Tensor) and t.shape == (75, 5)
    np.testing.assert_allclose(t.numpy(), dist, atol=1e-6)


def test_fewshot_equals_k_reciprocal_on_normalised_graph():
    rng = np.random.default_rng(6)
    protos, queries = rng.standard_normal((5, 8)) * 3, rng.standard_normal((10, 8))
    p = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    blocks = _blocks(np.concatenate([q, p]), 10)
    np.testing.assert_allclose(
        fewshot_k_reciprocal(protos, queries, 4, 3, 0.5), k_reciprocal_loop(*blocks, 4, 3, 0.5), atol=1e-5
    )


def test_matches_loop_oracle_medium_graph():
    rng = np.random.default_rng(7)
    blocks = _blocks(rng.standard_normal((600, 32)), 40)
    np.testing.assert_allclose(k_reciprocal(*blocks), k_reciprocal_loop(*blocks), atol=1e-5, rtol=0)
