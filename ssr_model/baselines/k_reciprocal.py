"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), vectorised.

Reproduces the published ``re_ranking`` procedure (SSR_METHOD section 6):

1. Build the symmetric (N, N) distance matrix of [query; gallery] from the three blocks,
   square it (float32), divide each column by its maximum and transpose; call it ``O``.
2. For every node i, its k1-reciprocal set R(i) = {j in top-(k1+1)(i) : i in top-(k1+1)(j)},
   where top-m(i) are the first m entries of ``argsort(O[i])``.
3. Expansion: for each c in R(i), if more than 2/3 of R_h(c) (the h-reciprocal set,
   h = round(k1 / 2), numpy rounding) lies in R(i), add R_h(c).
4. V[i, j] = exp(-O[i, j]) / sum over the expanded set, zero elsewhere.
5. Local query expansion (k2 != 1): V[i] <- mean of V[top-k2(i)].
6. Jaccard distance over all N nodes: 1 - s / (2 - s) with s = sum_c min(V[q, c], V[j, c]).
7. final = (1 - lambda) * jaccard + lambda * O, returned for the (query, gallery) block.

Where the time goes in the loop formulation is vectorised here: only the top
max(k1+1, k2) ranks of each row are found (``argpartition``); the reciprocal tests,
the 2/3-overlap test and the expansion are sparse boolean products over all nodes at
once; V and its query expansion are sparse CSR matrices; the Jaccard sums of minimums
visit only pairs of non-zero entries (CSR query rows against CSC columns) and are
accumulated with ``np.bincount`` (float64, then float32) in chunks of bounded size
(dense ``np.minimum`` over query blocks when V is nearly dense, as in few-shot episodes).

Tie caveat: only set membership of the top-m ranks matters. A row whose m-th and
(m+1)-th smallest values are equal (m in {k1+1, h+1, k2}) falls back to the same
``np.argsort`` call as the original, so ties resolve identically for a given numpy
version. Remaining differences against the loop are float32 summation order (~1e-7).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["k_reciprocal", "fewshot_k_reciprocal"]

_GATHER_ELEMENTS = 1 << 22  # bound on the gathered entries per Jaccard chunk


def _full_distance(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray) -> np.ndarray:
    """Squared, column-max-normalised, transposed (N, N) float32 matrix ``O``."""
    n_query, n_gallery = q_g_dist.shape
    if q_q_dist.shape != (n_query, n_query):
        raise ValueError(f"q_q_dist: shape {q_q_dist.shape}, expected ({n_query}, {n_query})")
    if g_g_dist.shape != (n_gallery, n_gallery):
        raise ValueError(f"g_g_dist: shape {g_g_dist.shape}, expected ({n_gallery}, {n_gallery})")
    # build the transpose directly: O[i, j] = full[j, i]^2 / max_a full[a, i]^2
    full_t = np.block([[q_q_dist.T, q_g_dist], [q_g_dist.T, g_g_dist.T]])
    if full_t.dtype == np.float32:
        np.square(full_t, out=full_t)
    else:
        full_t = np.square(full_t).astype(np.float32)
    full_t /= np.max(full_t, axis=1, keepdims=True)
    return full_t


def _top_ranks(dist: np.ndarray, m: int, boundaries: tuple[int, ...]) -> np.ndarray:
    """First m columns of ``np.argsort(dist)`` up to order inside tie-free prefixes.

    dist: (N, N). Returns (N, m) int64 whose first b columns hold, as a set, the same nodes
    as ``np.argsort(dist)[:, :b]`` for every b in ``boundaries``.
    """
    N = dist.shape[1]
    if m >= N:
        return np.argsort(dist)[:, :m]
    part = np.argpartition(dist, m, axis=1)[:, : m + 1]
    vals = np.take_along_axis(dist, part, axis=1)
    order = np.argsort(vals, axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    tied = np.zeros(dist.shape[0], dtype=bool)
    for b in boundaries:
        if 0 < b <= m:
            tied |= vals[:, b - 1] == vals[:, b]
    ranks = part[:, :m]
    for i in np.flatnonzero(tied):
        ranks[i] = np.argsort(dist[i])[:m]
    return ranks


def _membership(ranks: np.ndarray, m: int, N: int) -> sp.csr_matrix:
    """Boolean (N, N) CSR with row i marking ranks[i, :m]."""
    m = min(m, ranks.shape[1])
    rows = np.repeat(np.arange(N), m)
    cols = ranks[:, :m].ravel()
    return sp.csr_matrix((np.ones(rows.size, dtype=np.int32), (rows, cols)), shape=(N, N))


def _reciprocal(ranks: np.ndarray, k: int, N: int) -> sp.csr_matrix:
    """(N, N) 0/1 int32 CSR: j in R_k(i) iff j in top-(k+1)(i) and i in top-(k+1)(j)."""
    top = _membership(ranks, k + 1, N)
    rec = top.multiply(top.T).tocsr()
    rec.eliminate_zeros()
    return rec


def _expanded_sets(ranks: np.ndarray, k1: int, N: int) -> sp.csr_matrix:
    """(N, N) 0/1 CSR of the expanded k1-reciprocal sets (step 3)."""
    half = int(np.around(k1 / 2.0))
    rec = _reciprocal(ranks, k1, N)
    rec_half = _reciprocal(ranks, half, N)
    half_size = np.diff(rec_half.indptr)
    # overlap[i, c] = |R(i) & R_h(c)|, read only at c in R(i)
    overlap = (rec @ rec_half.T).multiply(rec).tocoo()
    accepted = overlap.data > (2.0 / 3.0) * half_size[overlap.col]
    acc = sp.csr_matrix(
        (np.ones(int(accepted.sum()), dtype=np.int32), (overlap.row[accepted], overlap.col[accepted])), shape=(N, N)
    )
    expanded = (rec + acc @ rec_half).tocsr()
    expanded.data[:] = 1
    expanded.sort_indices()
    return expanded


def _jaccard(V: sp.csr_matrix, n_query: int) -> np.ndarray:
    """(n_query, N) float32 Jaccard distances 1 - s / (2 - s), s = sum_c min(V[q, c], V[j, c]).

    Only pairs where both entries are non-zero contribute, so for each non-zero (q, c) of the
    query rows the non-zeros of column c are gathered (CSC) and their minimums scattered into
    s with ``np.bincount``. Queries are processed in chunks of bounded gathered size. When V
    is nearly dense (small graphs) dense ``np.minimum`` over query blocks is cheaper.
    """
    N = V.shape[0]
    Vq = V[:n_query].tocsr()
    Vc = V.tocsc()
    col_len = np.diff(Vc.indptr)
    pair_query = np.repeat(np.arange(n_query), np.diff(Vq.indptr))  # query of each non-zero (q, c)
    pair_len = col_len[Vq.indices]  # gathered entries per (q, c)
    per_query = np.bincount(pair_query, weights=pair_len, minlength=n_query)
    out = np.empty((n_query, N), dtype=np.float32)
    if n_query * N * N <= 4 * per_query.sum():
        # V is nearly dense (small graphs such as few-shot episodes): plain dense minimums
        Vd = V.toarray()
        step = max(1, _GATHER_ELEMENTS // (N * N))
        for q0 in range(0, n_query, step):
            q1 = min(q0 + step, n_query)
            s = np.minimum(Vd[q0:q1, None, :], Vd[None, :, :]).sum(axis=2, dtype=np.float32)
            out[q0:q1] = 1 - s / (2.0 - s)
        return out
    q0 = 0
    while q0 < n_query:
        q1, total = q0 + 1, per_query[q0]
        while q1 < n_query and total + per_query[q1] + (q1 + 1 - q0) * N <= _GATHER_ELEMENTS:
            total += per_query[q1]
            q1 += 1
        p0, p1 = Vq.indptr[q0], Vq.indptr[q1]
        lens = pair_len[p0:p1]
        pair_of = np.repeat(np.arange(p1 - p0), lens)  # (n_gathered,) pair of each gathered entry
        offsets = np.arange(pair_of.size) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = Vc.indptr[Vq.indices[p0:p1]][pair_of] + offsets
        mins = np.minimum(Vq.data[p0:p1][pair_of], Vc.data[pos])
        flat = (pair_query[p0:p1][pair_of] - q0) * N + Vc.indices[pos]
        s = np.bincount(flat, weights=mins, minlength=(q1 - q0) * N).astype(np.float32).reshape(q1 - q0, N)
        out[q0:q1] = 1 - s / (2.0 - s)
        q0 = q1
    return out


def k_reciprocal(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranked distances.

    Args:
        q_g_dist: query-gallery distances (n_query, n_gallery).
        q_q_dist: query-query distances (n_query, n_query).
        g_g_dist: gallery-gallery distances (n_gallery, n_gallery).
        k1, k2, lambda_value: reciprocal set size, query-expansion size, weight of ``O``.

    Returns:
        float32 (n_query, n_gallery) re-ranked distances, smaller is closer.
    """
    q_g_dist, q_q_dist, g_g_dist = (np.asarray(a) for a in (q_g_dist, q_q_dist, g_g_dist))
    n_query, n_gallery = q_g_dist.shape
    dist = _full_distance(q_g_dist, q_q_dist, g_g_dist)
    N = n_query + n_gallery
    half = int(np.around(k1 / 2.0))
    m = min(max(k1 + 1, k2, half + 1), N)
    ranks = _top_ranks(dist, m, (k1 + 1, half + 1, k2))

    expanded = _expanded_sets(ranks, k1, N)
    rows = np.repeat(np.arange(N), np.diff(expanded.indptr))
    weight = np.exp(-dist[rows, expanded.indices])
    row_sum = np.bincount(rows, weights=weight, minlength=N).astype(np.float32)
    V = sp.csr_matrix((weight / row_sum[rows], expanded.indices, expanded.indptr), shape=(N, N), dtype=np.float32)

    if k2 != 1:
        kk = min(k2, N)
        avg = _membership(ranks, kk, N).astype(np.float32)
        V = (avg @ V).tocsr()
        V.data = (V.data / np.float32(kk)).astype(np.float32)
        V.eliminate_zeros()

    jaccard = _jaccard(V, n_query)
    final = jaccard * (1 - lambda_value) + dist[:n_query] * lambda_value
    return final[:, n_query:].astype(np.float32, copy=False)


def fewshot_k_reciprocal(prototypes, queries, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """k-reciprocal distances for a transductive few-shot episode.

    The graph holds the L2-normalised queries (the re-ranking's 'query' side) and the
    L2-normalised prototypes (its 'gallery' side), with Euclidean distances; the
    prediction is ``argmin`` over the returned prototype axis.

    Args:
        prototypes: class prototypes (n_way, D), numpy array or torch tensor.
        queries: query features (n_query, D), same type as ``prototypes``.

    Returns:
        distances (n_query, n_way); a torch float32 tensor on the inputs' device when the
        inputs are tensors, else a float32 numpy array.
    """
    is_torch = hasattr(prototypes, "detach")
    device = prototypes.device if is_torch else None
    protos = prototypes.detach().cpu().double().numpy() if is_torch else np.asarray(prototypes, dtype=np.float64)
    qry = queries.detach().cpu().double().numpy() if is_torch else np.asarray(queries, dtype=np.float64)
    if protos.ndim != 2 or qry.ndim != 2 or protos.shape[1] != qry.shape[1]:
        raise ValueError(
            f"fewshot_k_reciprocal: prototypes {protos.shape} and queries {qry.shape}, expected (n_way, D) and (n_query, D)"
        )
    protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    qry = qry / np.maximum(np.linalg.norm(qry, axis=1, keepdims=True), 1e-12)

    def euclid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.sqrt(np.maximum(sq, 0.0))

    out = k_reciprocal(euclid(qry, protos), euclid(qry, qry), euclid(protos, protos), k1, k2, lambda_value)
    if is_torch:
        return torch.from_numpy(out).to(device)
    return out
