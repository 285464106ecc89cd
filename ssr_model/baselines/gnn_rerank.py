"""GNN re-ranking (Zhang et al., "Understanding image retrieval re-ranking: a graph neural
network perspective", 2020), without training, on each query's shortlist.

Nodes: the query and its shortlist, V = [q] + W items (n = W + 1), similarities S = V V^T.
1. Adjacency: A[i, j] = 1 when j is among the k1 most similar nodes of i (i itself included,
   first), else 0.
2. Two propagation rounds: A <- A + A^T; A[i] <- sum_{m < k2} s_{i, r_i(m)}^2 A[r_i(m)] over
   the k2 most similar nodes r_i(m) of i (i itself included); each row L2-normalised.
3. Score of item j: A[q] . A[j] (cosine of the propagated rows); ties keep the initial order.
Defaults (the authors' code): k1 = 26, k2 = 7; shortlist 400 (ours, like SuperGlobal's M).

The published method runs on all query and database nodes at once; here the graph is the
query's shortlist, so the neighbour lists and the transpose are those of that subgraph.

Memory per query: the dense (n, n) similarities and adjacency, n = W + 1; no N-sized array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gnn_rerank", "gnn_embeddings", "GNN_SHORTLIST"]

GNN_SHORTLIST = 400


def gnn_embeddings(nodes: np.ndarray, k1: int = 26, k2: int = 7) -> np.ndarray:
    """Propagated adjacency rows (n, n) float64, L2-normalised, of the nodes (n, D)."""
    n = nodes.shape[0]
    k1, k2 = min(k1, n), min(k2, n)
    sims = nodes.astype(np.float64) @ nodes.astype(np.float64).T
    # most similar first, the node itself first on ties with a duplicate (stable on -sims, then id)
    ranks = np.argsort(-sims, axis=1, kind="stable")
    self_first = np.argsort(ranks != np.arange(n)[:, None], axis=1, kind="stable")
    ranks = np.take_along_axis(ranks, self_first, axis=1)[:, :k1]
    A = np.zeros((n, n))
    A[np.arange(n)[:, None], ranks] = 1.0
    weights = np.take_along_axis(sims, ranks[:, :k2], axis=1) ** 2  # (n, k2)
    if k2 == 1:
        return A / np.linalg.norm(A, axis=1, keepdims=True)
    for _ in range(2):
        A = A + A.T
        A = np.einsum("nm,nmj->nj", weights, A[ranks[:, :k2]])
        A /= np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    return A


def gnn_rerank(
    query_feats: np.ndarray, db: np.ndarray, topk_ids: np.ndarray, k1: int = 26, k2: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each shortlist by GNN re-ranking.

    Args:
        query_feats: (Q, D) L2-normalised queries.
        db: (N, D) L2-normalised database (rows read by id only).
        topk_ids: (Q, W) each query's initial shortlist, best first.

    Returns: ids (Q, W) re-ordered best first, and their scores (Q, W) float32.
    """
    Q, W = topk_ids.shape
    ids_out = np.empty_like(topk_ids)
    scores_out = np.empty((Q, W), dtype=np.float32)
    for i in range(Q):
        nodes = np.concatenate([np.asarray(query_feats[i : i + 1]), np.asarray(db[topk_ids[i]])], axis=0)
        A = gnn_embeddings(nodes, k1, k2)
        scores = A[1:] @ A[0]
        order = np.argsort(-scores, kind="stable")
        ids_out[i], scores_out[i] = topk_ids[i][order], scores[order]
    return ids_out, scores_out
