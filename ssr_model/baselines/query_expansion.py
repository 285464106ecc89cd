"""Query expansion baselines for retrieval (SSR_METHOD section 6), plain numpy.

Rows are items: ``query_feats`` (Q, D) and ``db_feats`` (N, D), both L2-normalised;
``ranks`` (Q, N) holds database indices best first. Every function returns the expanded
queries (Q, D), L2-normalised. ``n`` is the number of top-ranked database items used
(``n = 0`` returns the queries unchanged, up to normalisation).

Memory: every function reads only the first n columns of ``ranks`` and gathers (Q, n + 1, D)
features (DQE: twice that, with its negatives from ``negatives``); nothing of size N, so
``ranks`` may be a (Q, n) prefix (a top-n search) at any database size.
"""

from __future__ import annotations

import numpy as np
from sklearn.svm import SVC

__all__ = ["aqe", "aqe_wd", "alpha_qe", "dqe", "hard_margin_dual"]

# libsvm box bound standing for "no upper bound": far above the alphas of separable unit-norm data
_HARD_C = 1e10


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _query_and_top(query_feats: np.ndarray, db_feats: np.ndarray, ranks: np.ndarray, n: int) -> np.ndarray:
    """(Q, n+1, D) stack of each query followed by its top-n database items."""
    Q, D = query_feats.shape
    if ranks.shape[0] != Q:
        raise ValueError(f"ranks: {ranks.shape[0]} rows, expected one per query ({Q})")
    if not 0 <= n <= ranks.shape[1]:
        raise ValueError(f"n = {n}, expected 0 <= n <= {ranks.shape[1]} (ranked items per query)")
    top = db_feats[ranks[:, :n]]  # (Q, n, D)
    return np.concatenate([query_feats[:, None, :], top], axis=1)


def _weighted(items: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """items (Q, K, D), weights (Q, K) or (K,) -> normalised weighted sums (Q, D)."""
    weights = np.broadcast_to(weights, items.shape[:2])
    return _normalise(np.einsum("qk,qkd->qd", weights, items)).astype(items.dtype, copy=False)


def aqe(query_feats: np.ndarray, db_feats: np.ndarray, ranks: np.ndarray, n: int) -> np.ndarray:
    """Average query expansion: normalised sum of the query and its top-n items."""
    items = _query_and_top(query_feats, db_feats, ranks, n)
    return _weighted(items, np.ones(n + 1))


def aqe_wd(query_feats: np.ndarray, db_feats: np.ndarray, ranks: np.ndarray, n: int) -> np.ndarray:
    """AQE with decay: weights (K - i) / K over the K = n + 1 items, query first (i = 0)."""
    items = _query_and_top(query_feats, db_feats, ranks, n)
    K = n + 1
    return _weighted(items, (K - np.arange(K)) / K)


def alpha_qe(query_feats: np.ndarray, db_feats: np.ndarray, ranks: np.ndarray, n: int, alpha: float = 3) -> np.ndarray:
    """alpha-QE: weights (q . x)^alpha over the query (weight 1) and its top-n items.

    The power is taken of the signed similarity (odd alpha keeps negative weights negative).
    """
    items = _query_and_top(query_feats, db_feats, ranks, n)
    sims = np.einsum("qd,qkd->qk", query_feats, items)
    return _weighted(items, np.power(sims, alpha))


def hard_margin_dual(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dual variables of the hard-margin linear SVM (with bias) on X (m, D), labels y (m,) in {+1, -1}.

    Solves ``min_a 1/2 a' H a - sum(a)`` with ``H = (y x)(y x)'``, subject to ``a >= 0``
    (no upper bound) and ``y' a = 0``. libsvm's SMO solves it as the box-constrained
    problem with a bound ``C`` no alpha of separable data reaches (``_HARD_C``, checked),
    where the box is inactive and the two problems have the same solution.

    Returns alphas (m,) float64. Raises ValueError when the data are not linearly
    separable (the hard-margin dual is then unbounded).
    """
    m = X.shape[0]
    svm = SVC(kernel="linear", C=_HARD_C, tol=1e-10).fit(X, y)
    alphas = np.zeros(m)
    alphas[svm.support_] = np.abs(svm.dual_coef_[0])
    if alphas.max() >= 1e-3 * _HARD_C:
        raise ValueError("dqe: positives and negatives are not linearly separable, the hard-margin SVM has no solution")
    return alphas


def dqe(
    query_feats: np.ndarray, db_feats: np.ndarray, ranks: np.ndarray, n: int, negatives: np.ndarray | None = None
) -> np.ndarray:
    """Discriminative QE: a hard-margin linear SVM per query (SSR_METHOD section 6).

    Positives: the query and its top-n items; negatives: the n + 1 lowest-ranked items,
    lowest last. ``negatives`` (Q, >= n + 1) database rows, lowest first (a top-k search on
    negated scores, ``NeighbourSearch.lowest``), gives them without a full ranking: then
    ``ranks`` needs only its first n columns, and memory is O(Q * n * D). Without it they
    are the last columns of ``ranks`` (Q, N). Expanded query = normalised
    sum_i alpha_i y_i x_i with the alphas of :func:`hard_margin_dual`.
    """
    items = _query_and_top(query_feats, db_feats, ranks, n)
    Q, K, D = items.shape
    n_items = db_feats.shape[0] if negatives is not None else ranks.shape[1]
    if 2 * K > n_items + 1:
        raise ValueError(f"dqe: n = {n} needs {K} negatives disjoint from the top-n, the database has {n_items} items")
    if negatives is not None:
        if negatives.shape[0] != Q or negatives.shape[1] < K:
            raise ValueError(f"dqe: negatives {negatives.shape}, expected ({Q}, >= {K}) lowest-scored rows per query")
        rows = np.asarray(negatives)[:, :K][:, ::-1]  # lowest last, as the last columns of a full ranking
    else:
        rows = ranks[:, ranks.shape[1] - K :]
    negs = db_feats[rows]  # (Q, K, D)
    labels = np.concatenate([np.ones(K), -np.ones(K)])
    out = np.empty((Q, D), dtype=np.float64)
    for q in range(Q):
        X = np.concatenate([items[q], negs[q]], axis=0).astype(np.float64)  # (2K, D)
        out[q] = (hard_margin_dual(X, labels) * labels) @ X
    return _normalise(out).astype(query_feats.dtype, copy=False)
