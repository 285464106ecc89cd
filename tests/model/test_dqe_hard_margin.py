"""DQE solves the hard-margin SVM dual (alpha >= 0, no upper bound), checked against the same
QP solved another way (scipy SLSQP with bounds), and the baselines' grids."""

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.svm import SVC

from ssr_model.baselines import QE_N, KReciprocalPoint, best_point, dqe, hard_margin_dual, krecip_grid


def _qp_dual(X, y):
    """Reference: min 1/2 a'Ha - sum(a), a >= 0 (bounds, no upper one), y'a = 0, by SLSQP."""
    H = (y[:, None] * X) @ (y[:, None] * X).T
    res = minimize(
        lambda a: 0.5 * a @ H @ a - a.sum(),
        np.full(len(y), 0.1),
        jac=lambda a: H @ a - 1.0,
        bounds=[(0.0, None)] * len(y),
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 2000},
        constraints=[{"type": "eq", "fun": lambda a: a @ y, "jac": lambda a: y}],
    )
    assert res.success, res.message
    return res.x


def _separable(seed, K=5, D=16, gap=0.3):
    """K positives and K negatives on the unit sphere, separated along the first axis."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * K, D))
    X[:K, 0] = np.abs(X[:K, 0]) + gap
    X[K:, 0] = -np.abs(X[K:, 0]) - gap
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, np.r_[np.ones(K), -np.ones(K)]


@pytest.mark.parametrize("seed", range(4))
def test_alphas_equal_the_exact_qp(seed):
    X, y = _separable(seed)
    got, want = hard_margin_dual(X, y), _qp_dual(X, y)
    np.testing.assert_allclose(got, want, atol=1e-6 * max(1.0, want.max()))
    # KKT of the hard margin: every point on or outside the margin, support vectors on it
    w = (got * y) @ X
    sv = got > 1e-6 * got.max()
    b = np.mean(y[sv] - X[sv] @ w)
    margins = y * (X @ w + b)
    assert margins.min() > 1 - 1e-6
    np.testing.assert_allclose(margins[sv], 1.0, atol=1e-6)


def test_differs_from_the_soft_margin_when_alphas_exceed_one():
    # a small margin needs alphas far above 1: SVC(C=1) clips them, the hard margin does not
    X, y = _separable(7, K=4, D=6, gap=0.02)
    want = _qp_dual(X, y)
    assert want.max() > 5.0
    np.testing.assert_allclose(hard_margin_dual(X, y), want, atol=1e-6 * want.max())
    soft = SVC(kernel="linear", C=1.0).fit(X, y)
    w_soft = soft.coef_[0] / np.linalg.norm(soft.coef_[0])
    w_hard = (want * y) @ X
    assert abs(w_soft @ w_hard / np.linalg.norm(w_hard)) < 1 - 1e-3


def test_dqe_expanded_query_is_the_qp_direction():
    rng = np.random.default_rng(3)
    db = rng.standard_normal((40, 12))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:2] + 0.2 * rng.standard_normal((2, 12))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranks = np.argsort(-(q @ db.T), axis=1)
    n = 3
    out = dqe(q, db, ranks, n)
    for i in range(2):
        X = np.concatenate([q[i : i + 1], db[ranks[i, :n]], db[ranks[i, -(n + 1) :]]])
        y = np.r_[np.ones(n + 1), -np.ones(n + 1)]
        w = (_qp_dual(X, y) * y) @ X
        np.testing.assert_allclose(out[i], w / np.linalg.norm(w), atol=1e-6)


def test_not_separable_is_refused():
    X = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match="not linearly separable"):
        hard_margin_dual(X, np.array([1.0, 1.0, -1.0, -1.0]))


def test_paper_grids_and_choice():
    grid = krecip_grid()
    assert len(grid) == 9 and grid[0] == KReciprocalPoint(40, 20, 0.1) and grid[-1] == KReciprocalPoint(160, 80, 0.5)
    assert QE_N == (1, 3, 5, 7, 9)
    assert best_point(grid[:3], [0.5, 0.7, 0.7]) == (grid[1], 0.7)  # ties go to the first
    with pytest.raises(ValueError, match="2 points and 1 scores"):
        best_point(grid[:2], [1.0])
