"""SuperGlobal's re-ranking (Shao et al., "Global features are all you need for image
retrieval and reranking", ICCV 2023), global descriptors only.

For a query q and its top-M items x_1..x_M (initial ranking, best first):
1. Database side: each x_m is refined with its K nearest items *within the top-M* (itself
   excluded), weight 1 for itself and beta * s for a neighbour of similarity s:
   x'_m = (x_m + beta * sum_j s_mj x_j) / (1 + beta * sum_j s_mj)   (not re-normalised).
2. Query side: the top-M are ordered by q . x'; the refined query is the element-wise
   maximum of the K + 1 best refined descriptors, q_max = max_{m <= K+1} x'_(m).
3. Score: (q . x'_m + q_max . x'_m) / 2, the mean of the two similarities; the top-M are
   ranked by it, items beyond M keep their initial order (appended by the caller).
Defaults M = 400, K = 9, beta = 0.15 (published). Steps 2-3 follow the authors' released code.

The expanded query handed to SSR as its query node is normalise(q + q_max), the direction
whose dot product with x' is twice the score.

Memory per query: the (M, M) similarities within the top-M, the (M, K, D) gathered
neighbours and the (M, D) refined descriptors (float64); no N-sized array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["superglobal_rerank", "SUPERGLOBAL_M"]

SUPERGLOBAL_M = 400


def superglobal_rerank(
    query_feats: np.ndarray, db: np.ndarray, topk_ids: np.ndarray, K: int = 9, beta: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each top-M list by SuperGlobal's refinement.

    Args:
        query_feats: (Q, D) L2-normalised queries.
        db: (N, D) L2-normalised database (rows read by id only).
        topk_ids: (Q, M) each query's initial top-M, best first.
        K: neighbours per refinement (K < M), beta: their weight factor.

    Returns: ids (Q, M) re-ordered best first, scores (Q, M) float32, expanded queries (Q, D) float32.
    """
    Q, M = topk_ids.shape
    K = min(K, M - 1)
    ids_out = np.empty_like(topk_ids)
    scores_out = np.empty((Q, M), dtype=np.float32)
    expanded = np.empty(query_feats.shape, dtype=np.float32)
    for i in range(Q):
        X = np.asarray(db[topk_ids[i]], dtype=np.float64)  # (M, D)
        q = np.asarray(query_feats[i], dtype=np.float64)
        sims = X @ X.T
        np.fill_diagonal(sims, -np.inf)  # itself is counted apart, with weight 1
        nbr = np.argsort(-sims, axis=1, kind="stable")[:, :K]  # (M, K)
        w = beta * np.take_along_axis(sims, nbr, axis=1)  # (M, K)
        refined = (X + np.einsum("mk,mkd->md", w, X[nbr])) / (1.0 + w.sum(axis=1, keepdims=True))
        first = refined @ q
        best = np.argsort(-first, kind="stable")[: K + 1]
        q_max = refined[best].max(axis=0)
        scores = (first + refined @ q_max) / 2.0
        order = np.argsort(-scores, kind="stable")
        ids_out[i], scores_out[i] = topk_ids[i][order], scores[order]
        e = q + q_max
        expanded[i] = e / max(np.linalg.norm(e), 1e-12)
    return ids_out, scores_out, expanded
