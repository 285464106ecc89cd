"""Diffusion re-ranking (Iscen et al., CVPR 2017), truncated to each query's shortlist.

For a query q with shortlist W (its initial top-W, best first), the graph has the W items as
nodes and the affinity

    a_ij = max(s_ij, 0)^gamma   if i != j, x_j in NN_k(x_i) and x_i in NN_k(x_j) (mutual), else 0,

where NN_k(x) are the k nearest *database* items of x (the global k-NN graph restricted to
the shortlist, as in the truncated variant). S = D^-1/2 A D^-1/2 with D the degrees (0 rows
stay 0). The query vector y has y_i = max(q . x_i, 0)^gamma on the query's kq best items and
0 elsewhere. f solves (I - alpha S) f = y by conjugate gradient (at most ``max_iter``
iterations, relative residual ``tol``); the shortlist is ranked by f, items f leaves equal
(e.g. unreached, f = 0) in their initial order. Defaults: k = 50, kq = 10, gamma = 3,
alpha = 0.99, 20 CG iterations, shortlist 1,000 (the truncation of the authors' large-scale
setting).

Memory per query: the (W, k) lists of its shortlist and a sparse W x W matrix with at most
W * k entries; overall the candidates' lists (U, k + 1) of :func:`candidate_neighbours`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .neighbours import CandidateNeighbours

__all__ = ["diffusion_rerank", "conjugate_gradient", "DIFFUSION_SHORTLIST"]

DIFFUSION_SHORTLIST = 1000


def conjugate_gradient(matvec, b: np.ndarray, max_iter: int = 20, tol: float = 1e-6) -> np.ndarray:
    """x with matvec(x) = b for a symmetric positive definite operator, from x = 0. b: (W,)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = tol * tol * rr
    for _ in range(max_iter):
        if rr <= stop or rr == 0.0:
            break
        Ap = matvec(p)
        step = rr / float(p @ Ap)
        x += step * p
        r -= step * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def affinity(ids: np.ndarray, neighbours: CandidateNeighbours, k: int, gamma: float = 3.0) -> sp.csr_matrix:
    """Symmetric (W, W) affinity of the shortlist ``ids`` (W,): mutual k-NN pairs, max(s, 0)^gamma."""
    W = len(ids)
    nbr, sims = neighbours.others(ids, k)  # (W, k) database ids, self excluded
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], nbr)
    inside = (pos < W) & (ids[order][np.minimum(pos, W - 1)] == nbr)  # neighbour is in the shortlist
    rows = np.repeat(np.arange(W), k)[inside.ravel()]
    cols = order[pos[inside]]
    weight = np.power(np.maximum(sims[inside].astype(np.float64), 0.0), gamma)
    knn = sp.csr_matrix((weight, (rows, cols)), shape=(W, W))
    mutual = knn.multiply(knn.T > 0)  # keep i->j only when j->i exists too
    return ((mutual + mutual.T) / 2).tocsr()


def diffusion_rerank(
    query_feats: np.ndarray,
    db: np.ndarray,
    topk_ids: np.ndarray,
    neighbours: CandidateNeighbours,
    k: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each shortlist by truncated diffusion.

    Args:
        query_feats: (Q, D) L2-normalised queries.
        db: (N, D) L2-normalised database (rows read by id only).
        topk_ids: (Q, W) each query's initial shortlist, best first.
        neighbours: lists of the shortlists' candidates, at least k others each.

    Returns: ids (Q, W) re-ordered best first, and f (Q, W) float32 in that order.
    """
    Q, W = topk_ids.shape
    ids_out = np.empty_like(topk_ids)
    f_out = np.empty((Q, W), dtype=np.float32)
    for i in range(Q):
        ids = topk_ids[i]
        A = affinity(ids, neighbours, k, gamma)
        degree = np.asarray(A.sum(axis=1)).ravel()
        inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
        S = sp.diags(inv_sqrt) @ A @ sp.diags(inv_sqrt)
        y = np.zeros(W)
        n = min(kq, W)
        sims = np.asarray(db[ids[:n]], dtype=np.float64) @ np.asarray(query_feats[i], dtype=np.float64)
        y[:n] = np.power(np.maximum(sims, 0.0), gamma)
        f = conjugate_gradient(lambda v, S=S: v - alpha * (S @ v), y, max_iter=max_iter, tol=tol)
        order = np.argsort(-f, kind="stable")
        ids_out[i], f_out[i] = ids[order], f[order]
    return ids_out, f_out
