"""Loop reference of k-reciprocal re-ranking (Zhong et al. 2017), step by step as published.

Test oracle for ``ssr_model.baselines.k_reciprocal``; written for clarity, not speed.
"""

from __future__ import annotations

import numpy as np


def _reciprocal_set(initial_rank: np.ndarray, node: int, k: int) -> np.ndarray:
    """Nodes among the first k+1 ranks of ``node`` that also have ``node`` in their first k+1."""
    forward = initial_rank[node, : k + 1]
    backward = initial_rank[forward, : k + 1]
    hits = np.where(backward == node)[0]
    return forward[hits]


def k_reciprocal_loop(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3) -> np.ndarray:
    n_query = q_g_dist.shape[0]
    top = np.concatenate([q_q_dist, q_g_dist], axis=1)
    bottom = np.concatenate([q_g_dist.T, g_g_dist], axis=1)
    dist = np.power(np.concatenate([top, bottom], axis=0), 2).astype(np.float32)
    dist = np.transpose(1.0 * dist / np.max(dist, axis=0))
    n_all = dist.shape[0]
    V = np.zeros_like(dist).astype(np.float32)
    initial_rank = np.argsort(dist).astype(np.int32)
    half = int(np.around(k1 / 2.0))

    for i in range(n_all):
        rec = _reciprocal_set(initial_rank, i, k1)
        expansion = rec
        for candidate in rec:
            cand_rec = _reciprocal_set(initial_rank, candidate, half)
            if len(np.intersect1d(cand_rec, rec)) > 2.0 / 3 * len(cand_rec):
                expansion = np.append(expansion, cand_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)

    dist = dist[:n_query]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(n_all):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe

    inv_index = [np.where(V[:, c] != 0)[0] for c in range(n_all)]
    jaccard = np.zeros_like(dist, dtype=np.float32)
    for i in range(n_query):
        temp_min = np.zeros(shape=[1, n_all], dtype=np.float32)
        non_zero = np.where(V[i, :] != 0)[0]
        for c in non_zero:
            rows = inv_index[c]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)

    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:n_query, n_query:]
