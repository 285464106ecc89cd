"""Top-k search streamed over database blocks, and the neighbour lists of a shortlist's candidates.

The graph re-rankers of the retrieval track (alpha-DBA, diffusion) need the neighbours of the
items in each query's shortlist. They get them here, for the union of the shortlists only,
with one top-k search of those candidates against the database, block by block: never an
(N, N) matrix, never the lists of all N items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["CandidateNeighbours", "LocalSearch", "NeighbourSearch", "candidate_neighbours", "topk_search"]


def topk_search(
    queries: np.ndarray, db: np.ndarray, k: int, db_block: int = 16384, query_block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar database rows (dot product) of each query, best first.

    queries (M, D) and db (N, D) (any array-like that slices, e.g. a memory map). Returns ids
    (M, k) int64 and similarities (M, k) float32, k capped at N; equal similarities are
    ordered by id. Memory: O(query_block * (db_block + k)) similarities at a time, plus the
    (M, k) result.
    """
    M, D = queries.shape
    N = db.shape[0]
    k = min(int(k), N)
    out_ids = np.empty((M, k), dtype=np.int64)
    out_sims = np.empty((M, k), dtype=np.float32)
    for q0 in range(0, M, query_block):
        qb = np.asarray(queries[q0 : q0 + query_block], dtype=np.float32)
        ids = np.empty((len(qb), 0), dtype=np.int64)
        sims = np.empty((len(qb), 0), dtype=np.float32)
        for b0 in range(0, N, db_block):
            block = np.asarray(db[b0 : b0 + db_block], dtype=np.float32)
            s = np.concatenate([sims, qb @ block.T], axis=1)
            i = np.concatenate([ids, np.broadcast_to(np.arange(b0, b0 + len(block)), (len(qb), len(block)))], axis=1)
            if s.shape[1] > k:
                keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
                s, i = np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)
            sims, ids = s, i
        order = np.lexsort((ids, -sims), axis=1)
        out_ids[q0 : q0 + len(qb)] = np.take_along_axis(ids, order, axis=1)
        out_sims[q0 : q0 + len(qb)] = np.take_along_axis(sims, order, axis=1)
    return out_ids, out_sims


@dataclass(frozen=True)
class CandidateNeighbours:
    """Neighbour lists of the candidates: ids (U,) sorted database ids; nbr_ids / nbr_sims (U, L)
    their L most similar database items (the item itself included, normally first)."""

    ids: np.ndarray
    nbr_ids: np.ndarray
    nbr_sims: np.ndarray

    def rows(self, db_ids: np.ndarray) -> np.ndarray:
        """Row of each database id (any shape) in ``ids``; every id must be a candidate."""
        pos = np.searchsorted(self.ids, db_ids)
        if np.any(pos >= len(self.ids)) or np.any(self.ids[np.minimum(pos, len(self.ids) - 1)] != db_ids):
            raise ValueError("CandidateNeighbours: an id is not among the candidates")
        return pos

    def others(self, db_ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n neighbours of each id (W,) other than itself: ids and sims (W, n), n <= L - 1."""
        rows = self.rows(db_ids)
        nbr, sim = self.nbr_ids[rows], self.nbr_sims[rows]
        if n > nbr.shape[1] - 1:
            raise ValueError(
                f"CandidateNeighbours: {n} neighbours asked, the lists hold {nbr.shape[1] - 1} besides the item"
            )
        # drop the item itself where it appears, else the last entry, keeping the order
        is_self = nbr == db_ids[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), nbr.shape[1] - 1)
        keep = np.ones(nbr.shape, dtype=bool)
        keep[np.arange(len(nbr)), drop] = False
        L = nbr.shape[1] - 1
        return nbr[keep].reshape(-1, L)[:, :n], sim[keep].reshape(-1, L)[:, :n]


def candidate_neighbours(
    db: np.ndarray, topk_ids: np.ndarray, k: int, db_block: int = 16384, search: NeighbourSearch | None = None
) -> CandidateNeighbours:
    """Neighbour lists (k others plus the item) of the union of the shortlists ``topk_ids`` (Q, W).

    One top-(k+1) search of the U <= Q * W distinct candidates against db (N, D), streamed in
    blocks of ``db_block`` rows (or by ``search``, e.g. blocks of candidates on an actor
    pool). Memory: O(U * (k + D)) plus one block of similarities.
    """
    ids = np.unique(np.asarray(topk_ids, dtype=np.int64))
    feats = np.asarray(db[ids], dtype=np.float32)
    nbr_ids, nbr_sims = (search or LocalSearch(db, db_block)).top(feats, min(k + 1, db.shape[0]))
    return CandidateNeighbours(ids, nbr_ids, nbr_sims)


class NeighbourSearch(Protocol):
    """The database searches of the re-rankers: ``top(feats (M, D), k)`` -> (rows (M, k) int64,
    sims (M, k) float32), the k most similar database rows, best first; ``lowest(feats, k)``
    -> the same for the k least similar (lowest first), i.e. a top-k search on negated
    scores. Implementations stream the database; ``ssr_tasks`` runs them on an actor pool."""

    def top(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def top_with_lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``top(feats, k)`` and the lowest similarity of each row (M,), in one pass."""
        ...


class LocalSearch:
    """:class:`NeighbourSearch` in this process over db (N, D) (an array or a memory map),
    streamed in blocks of ``db_block`` rows (:func:`topk_search`)."""

    def __init__(self, db: np.ndarray, db_block: int = 16384):
        self.db, self.db_block = db, db_block

    def top(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return topk_search(feats, self.db, k, db_block=self.db_block)

    def lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, sims = topk_search(-np.asarray(feats, dtype=np.float32), self.db, k, db_block=self.db_block)
        return ids, -sims

    def top_with_lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, sims = self.top(feats, k)
        return ids, sims, self.lowest(feats, 1)[1][:, 0]
