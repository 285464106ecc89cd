"""Top-K inner-product search over a database that arrives block by block (faiss).

As in faiss contrib's ``knn_ground_truth(xq, db_iterator, k)``, the functions here take
arrays and iterators of database blocks and merge per-block results; they never open
files (the similarity store's builder, ``storage.simstore.build_topk_store``, does that).

- exact: each block's score tile is one matrix product, merged into a running top k
  by a ``faiss.ResultHeap``. Extra memory: one (B, block rows) score tile plus (B, k).
- ivf: a ``faiss.IndexIVFFlat`` (inner product) built once over the whole database from
  trained centroids (:func:`train_ivf_centroids`, :func:`ivf_index`), searched with
  ``nprobe`` lists per query.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

SEARCH_METHODS = ("exact", "ivf")


@dataclass(frozen=True)
class TopkSearch:
    """How each query's top k is found; recorded in the similarity store's manifest.

    ``exact``: every database item is scored (block by block); the reference.
    ``ivf``: approximate, a faiss IVF-Flat inner-product index (spherical k-means coarse
    quantiser with ``nlist`` lists, ``nprobe`` lists scanned per query). Its cost per query
    is about ``nprobe / nlist`` of the exact search, for a recall below 1 that depends on
    the data; measure it (``benchmarks/bench_scale.py topk --recall``) before relying on it.
    nlist 0 means about 4 * sqrt(Nd); seed fixes the training sample and k-means.
    """

    method: str = "exact"
    nlist: int = 0
    nprobe: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {self.method!r}")
        if self.nlist < 0 or self.nprobe < 1:
            raise ValueError(
                f"ivf search needs nlist >= 0 (0: automatic) and nprobe >= 1, "
                f"got nlist={self.nlist}, nprobe={self.nprobe}"
            )

    def n_lists(self, n_db: int) -> int:
        """Inverted lists for a database of n_db items (at least 39 training points each)."""
        want = self.nlist or int(round(4 * math.sqrt(n_db)))
        return max(1, min(want, n_db // 39))

    def manifest_entry(self, n_db: int) -> dict[str, Any]:
        if self.method == "exact":
            return {"method": "exact"}
        return {"method": "ivf", "nlist": self.n_lists(n_db), "nprobe": self.nprobe, "seed": self.seed}


def row_blocks(x: np.ndarray, block_size: int) -> Iterator[np.ndarray]:
    """Consecutive row slices of x (N, D), ``block_size`` rows each (views, no copies)."""
    for a in range(0, x.shape[0], block_size):
        yield x[a : a + block_size]


def train_ivf_centroids(database: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (nlist, D) float32 of a seeded sample of at most
    64 * nlist rows of database (Nd, D) float32."""
    Nd, D = database.shape
    rows = np.sort(np.random.default_rng(seed).choice(Nd, min(Nd, 64 * nlist), replace=False))
    clus = faiss.Clustering(D, nlist)
    clus.seed, clus.spherical, clus.max_points_per_centroid = seed, True, 64
    clus.train(np.ascontiguousarray(database[rows], dtype=np.float32), faiss.IndexFlatIP(D))
    return faiss.vector_to_array(clus.centroids).reshape(nlist, D).astype(np.float32)


def ivf_index(centroids: np.ndarray, database_blocks: Iterable[np.ndarray], nprobe: int) -> faiss.IndexIVFFlat:
    """An inner-product IVF-Flat index with the given coarse centroids (nlist, D), holding
    a copy of every database row (row numbers in block order), scanning nprobe lists."""
    nlist, D = centroids.shape
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    for block in database_blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    index.nprobe = min(nprobe, nlist)
    return index


def _exact(
    queries: np.ndarray, database_blocks: Iterable[np.ndarray], k: int, lowest: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of queries (B, D) over the blocks: scores (B, k), rows (B, k), best first.
    lowest: a (B,) float32 array that receives each query's lowest score (the same pass).

    Each block's (B, Nb) score tile is one BLAS matrix product; a ``faiss.ResultHeap``
    keeps the running top k. (A ``faiss.IndexFlatIP`` per block finds the same neighbours,
    but the BLAS bundled with faiss-cpu 1.15 scored tiles about 5x slower than numpy's here.)
    """
    B = queries.shape[0]
    heap = faiss.ResultHeap(B, k, keep_max=True)
    every_query = np.arange(B)
    first_row = 0
    for block in database_blocks:
        scores = queries @ block.T  # (B, Nb)
        if lowest is not None and scores.shape[1]:
            np.minimum(lowest, scores.min(axis=1), out=lowest)
        # The heap breaks score ties towards the larger id, and -1 marks an empty slot: give
        # it -2 - row, so that the lower row wins a tie, as in a stable sort by score.
        heap.add_result_subset(every_query, scores, -2 - np.arange(first_row, first_row + block.shape[0]))
        first_row += block.shape[0]
        del scores  # before the next tile is allocated: one tile at a time
    if first_row < k:
        raise ValueError(f"top-k search: k={k} but the database has {first_row} rows")
    heap.finalize()
    return heap.D, -2 - heap.I


def topk_search(
    queries: np.ndarray,
    database_blocks: Iterable[np.ndarray],
    k: int,
    *,
    database_ids: np.ndarray | None = None,
    query_ids: np.ndarray | None = None,
    exclude_self: bool = False,
    ivf: faiss.Index | None = None,
    lowest: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database items by inner product for queries (B, D) float32.

    database_blocks: the database (Nd, D) float32 as consecutive row blocks, read once
    (exact search), or only for the queries whose probed lists hold fewer than k items
    (ivf; faiss pads those with -1, and they are answered exactly). database_ids: (Nd,)
    int64 id of each row (default: the row number). exclude_self drops the database item
    whose id equals the query's id in query_ids (B,); when none does, the (k+1)-th best is
    dropped instead. ivf: an index from :func:`ivf_index` over the same rows, searched
    instead of scoring every item. lowest: exact search only, a (B,) float32 array that
    receives each query's lowest score over the whole database (start it at +inf).

    Returns neighbor_ids (B, k) int64 and scores (B, k) float32, best first.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    B = q.shape[0]
    kk = k + 1 if exclude_self else k
    if ivf is None:
        scores, rows = _exact(q, database_blocks, kk, lowest)
    else:
        scores, rows = ivf.search(q, kk)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if short.size:
            scores[short], rows[short] = _exact(q[short], database_blocks, kk)
    ids = rows if database_ids is None else np.asarray(database_ids)[rows]
    if exclude_self:
        if query_ids is None:
            raise ValueError("top-k search: exclude_self needs query_ids")
        is_self = ids == np.asarray(query_ids)[:, None]
        drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), kk - 1)
        keep = np.ones_like(is_self)
        keep[np.arange(B), drop] = False
        ids, scores = ids[keep].reshape(B, k), scores[keep].reshape(B, k)
    return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)
