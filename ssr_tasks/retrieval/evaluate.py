"""Retrieval evaluation: baseline settings chosen on validation, initial rankings per method,
stores for re-ranking, revisited mAP.

Methods: features only, AQE, AQEwD, alpha-QE, DQE and k-reciprocal, and the shortlist
re-rankers alpha-DBA-QE, diffusion, GNN and SuperGlobal (``RETRIEVAL_METHODS``; ``methods``
picks the rows); each is also followed by SSR on its top-k (the SSR query node is the
expanded query for QE methods, alpha-DBA-QE and SuperGlobal, the query itself otherwise).
QE's n (per QE method), the k-reciprocal (k1, k2, lambda) and each shortlist re-ranker's
setting are chosen on the validation set (held-out training clusters), by the
medium-protocol mAP of the method itself, from their grids; the test queries are never
used for a choice. The shortlist re-rankers that need neighbours of neighbours get them
from the top-k search of the union of the shortlists against the database, block by block.

Memory at any N (``search``: a ``NeighbourSearch``, by default in this process, or on the
actor pool, ``ssr_tasks.retrieval.ray_jobs.CandidateSearchPool``): no method builds an
N x N matrix or the neighbour lists of all N items. k-reciprocal re-ranks each query's
top ``KRECIP_SHORTLIST`` (``k_reciprocal_shortlist``: lists of the queries, their
shortlists and those lists' items only); the shortlist re-rankers get the lists of the
union of the shortlists; DQE's negatives come from a top-k search on negated scores.
Every method's ranking is its re-ranked top-W followed by the rest in initial order.
What does scale with N is the evaluation itself: a row's ranking is (Q, N) int64 ranks
plus (Q, N) float32 scores while it is computed (12 bytes per query and database item: 0.8
GiB at Q = 70, N = 1M), because revisited mAP reads whole rankings; ``ranking`` makes one
(Q, N) float32 similarity matrix and its argsort at a time. The pipeline holds one row at a
time beside the initial ranking (``RankingSession``, ``ssr_tasks.retrieval.ranker``: each row
is written as int32 ranks and dropped) and the database as a memory map; ``method_rankings``
returns all rows at once. Queries are few (tens); the SSR re-ranking goes through Parquet
stores and the actor pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ssr_model.baselines import (
    RETRIEVAL_METHODS,
    SHORTLIST_METHODS,
    KReciprocalPoint,
    ShortlistPoint,
    alpha_qe,
    aqe,
    aqe_wd,
    best_point,
    candidate_neighbours,
    dqe,
    shortlist_grids,
)
from ssr_model.baselines.k_reciprocal import KRECIP_SHORTLIST, NodeListCache, k_reciprocal_shortlist
from ssr_model.baselines.neighbours import CandidateNeighbours, NeighbourSearch
from ssr_model.metrics import revisited_map
from ssr_tasks.retrieval.train import ValidationSet
from storage.features import iter_embeddings
from storage.simstore import SimilarityStore, create_store
from storage.topk import row_blocks, topk_search

QE_METHODS: tuple[tuple[str, Callable], ...] = (("AQE", aqe), ("AQEwD", aqe_wd), ("alpha-QE", alpha_qe), ("DQE", dqe))


class CandidateSearcher:
    """Plain class behind a candidate-search actor: exact top-k (and lowest-k) database rows
    of blocks of feature rows, scoring the database block by block (``storage.topk``).

    database: the (N, D) float32 L2-normalised rows (an array; in the pool, one copy in
    Ray's object store shared by the actors of a node), the path of such rows as a ``.npy``
    (memory-mapped at every call), or the path of a features table, read block by block
    (``iter_embeddings`` of ``split``, normalised) at every call, so an actor never holds it. threads: BLAS threads per call (1 in the pool: one per actor CPU;
    None: as the process has). The default ``NeighbourSearch`` of this module, in process.
    Memory per call: one (rows_per_call, db_block) float32 score tile (64 MiB at the
    defaults) plus the (M, k) results, whatever M.
    """

    def __init__(
        self,
        database: Any,
        split: str | None = "database",
        db_block: int = 16384,
        threads: int | None = None,
        rows_per_call: int = 1024,
    ):
        self.database, self.split, self.db_block, self.threads = database, split, db_block, threads
        self.rows_per_call = rows_per_call

    def _blocks(self):
        if isinstance(self.database, (str, Path)) and str(self.database).endswith(".npy"):
            return row_blocks(np.load(self.database, mmap_mode="r"), self.db_block)  # rows already unit length
        if isinstance(self.database, (str, Path)):
            return (emb for _, emb in iter_embeddings(self.database, self.db_block, self.split, normalise=True))
        return row_blocks(self.database, self.db_block)

    def _search(self, feats: np.ndarray, k: int, lowest: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        with threadpool_limits(self.threads):
            for a in range(0, max(len(feats), 1), self.rows_per_call):
                low = None if lowest is None else lowest[a : a + self.rows_per_call]
                parts.append(topk_search(feats[a : a + self.rows_per_call], self._blocks(), k, lowest=low))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def top_with_lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`top` and each row's lowest similarity over the database (M,), in one pass."""
        feats = np.asarray(feats, dtype=np.float32)
        lowest = np.full(len(feats), np.inf, dtype=np.float32)
        rows, sims = self._search(feats, k, lowest)
        return rows, sims, lowest

    def top(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """feats (M, D) -> database rows (M, k) int64 and similarities (M, k) float32, best first."""
        return self._search(np.asarray(feats, dtype=np.float32), k)

    def lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k least similar database rows (M, k), lowest first, and their similarities."""
        rows, sims = self._search(-np.asarray(feats, dtype=np.float32), k)
        return rows, -sims


@dataclass(frozen=True)
class MethodRanking:
    """query (Q, D) features used as SSR's query node; ranks (Q, N) db indices best first; scores (Q, N)."""

    name: str
    query: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class BaselineChoice:
    """The settings chosen on validation: QE's n per QE method, the k-reciprocal point (None
    when k-reciprocal is not among ``methods``), each shortlist re-ranker's point, and the
    validation mAP (medium, percent) of every setting tried, by ``"<method> <setting>"``.
    methods: the rows, in ``RETRIEVAL_METHODS`` order; a shortlist re-ranker without a chosen
    point runs at its published default."""

    qe_n: tuple[tuple[str, int], ...]
    krecip: KReciprocalPoint | None
    val_map: tuple[tuple[str, float], ...]
    shortlist: tuple[tuple[str, ShortlistPoint], ...] = ()
    methods: tuple[str, ...] = RETRIEVAL_METHODS

    def n_for(self, method: str) -> int:
        return dict(self.qe_n)[method]

    def point_for(self, method: str) -> ShortlistPoint:
        return dict(self.shortlist).get(method, SHORTLIST_METHODS[method].default)

    def as_params(self) -> dict[str, str]:
        """Flat ``chosen.*`` entries for the tracker and the log (those of the rows' methods)."""
        out = {f"chosen.qe_n.{m}": str(n) for m, n in self.qe_n}
        if self.krecip is not None:
            out["chosen.krecip"] = self.krecip.label()
        out.update({f"chosen.{m}": p.label() for m, p in self.shortlist})
        if self.methods != RETRIEVAL_METHODS:
            out["chosen.methods"] = ",".join(self.methods)
        return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranking(query: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of query (Q, D) against db (N, D): ranks (Q, N) int64 best first and their
    scores (Q, N) float32. Memory: the (Q, N) similarities, their argsort and the sorted
    scores, 16 bytes per query and item at the peak (1.0 GiB at Q = 70, N = 1M)."""
    sims = query @ db.T
    ranks = np.argsort(-sims, axis=1, kind="stable")
    return ranks, np.take_along_axis(sims, ranks, axis=1)


def krecip_ranking(
    query: np.ndarray,
    db: np.ndarray,
    point: KReciprocalPoint,
    *,
    initial: tuple[np.ndarray, np.ndarray] | None = None,
    search: NeighbourSearch | None = None,
    width: int = KRECIP_SHORTLIST,
    cache: NodeListCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal ranking of L2-normalised query (Q, D) against db (N, D): (ranks (Q, N),
    scores (Q, N)), the top ``width`` re-ranked by k-reciprocal distance (score: minus the
    distance), then the rest in initial order. initial: the features' (ranks, scores) when
    already computed. cache: node lists shared between calls on the same query and db (a
    validation grid). Memory: that of ``k_reciprocal_shortlist`` plus the (Q, N) ranking;
    equal to the full-graph k-reciprocal when width >= N."""
    ranks, scores = initial if initial is not None else ranking(query, db)
    W = min(db.shape[0], width)
    s = search or CandidateSearcher(db)
    ids, dist = k_reciprocal_shortlist(
        query,
        db,
        ranks[:, :W],
        k1=point.k1,
        k2=point.k2,
        lambda_value=point.lambda_value,
        search=s.top_with_lowest,
        cache=cache,
    )
    return _full_ranking(ids, -dist, ranks, scores)


def _medium_map(ranks: np.ndarray, gnd: list[dict]) -> float:
    return revisited_map(ranks, gnd)["medium"]["map"]


def _selected(methods: Sequence[str] | None) -> tuple[str, ...]:
    """The rows in ``RETRIEVAL_METHODS`` order; unknown names and an empty list are refused."""
    if methods is None:
        return RETRIEVAL_METHODS
    unknown = [m for m in methods if m not in RETRIEVAL_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"methods: unknown method {unknown[0]!r} (known: {', '.join(RETRIEVAL_METHODS)})"
            if unknown
            else "methods: expected at least one retrieval method"
        )
    return tuple(m for m in RETRIEVAL_METHODS if m in methods)


def _shortlist_neighbours(
    names: Sequence[str],
    db: np.ndarray,
    ranks: np.ndarray,
    points: Mapping[str, Sequence[ShortlistPoint]],
    search: NeighbourSearch | None = None,
) -> CandidateNeighbours | None:
    """One neighbour search serving every named method at every point: the union of the
    longest shortlist of those that need neighbours, against db, block by block."""
    need = [(SHORTLIST_METHODS[m].shortlist, max(SHORTLIST_METHODS[m].neighbours(p) for p in points[m])) for m in names]
    need = [(w, k) for w, k in need if k > 0]
    if not need:
        return None
    N = db.shape[0]
    width = min(N, max(w for w, _ in need))
    return candidate_neighbours(db, ranks[:, :width], min(N - 1, max(k for _, k in need)), search=search)


def _full_ranking(
    ids: np.ndarray, scores: np.ndarray, ranks: np.ndarray, initial_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, N) ranking: the re-ranked shortlist (Q, W) first, the rest in initial order; the rest's
    scores capped at the shortlist's lowest so that scores never increase along a row."""
    W = ids.shape[1]
    rest = (
        np.minimum(initial_scores[:, W:], scores.min(axis=1, keepdims=True))
        if W < ranks.shape[1]
        else initial_scores[:, W:]
    )
    return np.concatenate([ids, ranks[:, W:]], axis=1), np.concatenate([scores, rest], axis=1).astype(np.float32)


def _shortlist_ranking(
    name: str,
    query: np.ndarray,
    db: np.ndarray,
    ranks: np.ndarray,
    scores: np.ndarray,
    neighbours: CandidateNeighbours | None,
    point: ShortlistPoint,
) -> MethodRanking:
    method = SHORTLIST_METHODS[name]
    width = min(db.shape[0], method.shortlist)
    ids, s, expanded = method.rerank(query, db, ranks[:, :width], neighbours, point)
    full, full_scores = _full_ranking(ids, s, ranks, scores)
    return MethodRanking(name, query if expanded is None else expanded.astype(np.float32), full, full_scores)


def shortlist_points(baselines) -> dict[str, list[ShortlistPoint]]:
    """The validation grid of each shortlist re-ranker from the baselines group
    (``RetrievalBaselineParams``); alpha-DBA-QE's n_qe comes from its qe_n_grid."""
    return shortlist_grids(
        dba_n=baselines.dba_n_grid,
        qe_n=baselines.qe_n_grid,
        diffusion_k=baselines.diffusion_k_grid,
        gnn_k=baselines.gnn_k_pairs,
        superglobal_k=baselines.superglobal_k_grid,
        superglobal_beta=baselines.superglobal_beta_grid,
    )


def expanded_query(
    name: str, query: np.ndarray, db: np.ndarray, ranks: np.ndarray, n: int, search: NeighbourSearch | None = None
) -> np.ndarray:
    """The normalised expanded queries (Q, D) of QE method ``name`` with its n; DQE's n + 1
    negatives come from a top-k search on negated scores (``search.lowest``), so no method
    reads more than the first n columns of ranks (Q, >= n)."""
    fn = dict(QE_METHODS)[name]
    if name == "DQE":
        negatives, _ = (search or CandidateSearcher(db)).lowest(query, n + 1)
        return _normalise(np.asarray(dqe(query, db, ranks[:, :n], n, negatives=negatives), np.float32))
    return _normalise(np.asarray(fn(query, db, ranks, n), np.float32))


def choose_baselines(
    val: ValidationSet,
    qe_grid: Sequence[int],
    krecip_points: Sequence[KReciprocalPoint],
    methods: Sequence[str] | None = None,
    shortlist_points: Mapping[str, Sequence[ShortlistPoint]] | None = None,
    search: NeighbourSearch | None = None,
) -> BaselineChoice:
    """QE's n (per QE method), the k-reciprocal point and each shortlist re-ranker's point with
    the best validation mAP, for the ``methods`` rows (default: all of ``RETRIEVAL_METHODS``).
    shortlist_points: the grid per shortlist re-ranker (default ``shortlist_grids()`` with
    alpha-DBA-QE's n_qe from ``qe_grid``). search: the database searches (default: in this
    process over val.database)."""
    rows = _selected(methods)
    grids = shortlist_points if shortlist_points is not None else shortlist_grids(qe_n=qe_grid)
    q, db, ranks = val.queries, val.database, val.initial
    search = search or CandidateSearcher(db)
    tried: list[tuple[str, float]] = []
    qe_n = []
    for name, _ in QE_METHODS:
        if name not in rows:
            continue
        grid = [n for n in qe_grid if name != "DQE" or 2 * (n + 1) <= ranks.shape[1] + 1]
        scores = [_medium_map(ranking(expanded_query(name, q, db, ranks, n, search), db)[0], val.gnd) for n in grid]
        tried += [(f"{name} n={n}", s) for n, s in zip(grid, scores)]
        qe_n.append((name, best_point(grid, scores)[0]))
    krecip = None
    if "k-reciprocal" in rows:
        initial = ranks, np.take_along_axis(q @ db.T, ranks, axis=1)
        # one list search serves the grid: the widest lists first, narrower points reuse them
        cache = NodeListCache()
        by_width = sorted(range(len(krecip_points)), key=lambda i: -max(krecip_points[i].k1 + 1, krecip_points[i].k2))
        found = {
            i: _medium_map(
                krecip_ranking(q, db, krecip_points[i], initial=initial, search=search, cache=cache)[0], val.gnd
            )
            for i in by_width
        }
        scores = [found[i] for i in range(len(krecip_points))]
        tried += [(f"k-reciprocal {p.label()}", s) for p, s in zip(krecip_points, scores)]
        krecip = best_point(list(krecip_points), scores)[0]
    names = [m for m in rows if m in SHORTLIST_METHODS]
    points = {m: list(grids.get(m) or [SHORTLIST_METHODS[m].default]) for m in names}
    chosen = []
    if names:
        initial_scores = np.take_along_axis(q @ db.T, ranks, axis=1)
        neighbours = _shortlist_neighbours(names, db, ranks, points, search)
        for m in names:
            scores = [
                _medium_map(_shortlist_ranking(m, q, db, ranks, initial_scores, neighbours, p).ranks, val.gnd)
                for p in points[m]
            ]
            tried += [(f"{m} {p.label()}", s) for p, s in zip(points[m], scores)]
            chosen.append((m, best_point(points[m], scores)[0]))
    return BaselineChoice(tuple(qe_n), krecip, tuple(tried), tuple(chosen), rows)


class RankingSession:
    """The rows of ``choice.methods`` computed one at a time, sharing what they share: the
    initial ranking of the queries (every row starts from it) and the candidate neighbours of
    the shortlist re-rankers (one search for all of them, at the widest point). Each shared
    stage is computed on first use and can be called alone, so that its cost can be
    measured apart (``ssr_tasks.retrieval.ranker``).

    query (Q, D), db (N, D): an array or a memory map; ``normalised=True`` when db's rows
    are already unit length (a memory-mapped database is then never copied into memory).
    Memory: a row's (Q, N) ranks and scores while it is computed, the initial (Q, N)
    ranking throughout, the candidate neighbours of the shortlists (their (M, k) lists).
    """

    def __init__(
        self,
        query: np.ndarray,
        db: np.ndarray,
        choice: BaselineChoice,
        search: NeighbourSearch | None = None,
        normalised: bool = False,
    ):
        self.query = _normalise(np.asarray(query, dtype=np.float32))
        self.db = db if normalised else _normalise(db)
        self.choice = choice
        self.search = search or CandidateSearcher(self.db)
        self._initial: tuple[np.ndarray, np.ndarray] | None = None
        self._neighbours: tuple[CandidateNeighbours | None] | None = None

    @property
    def shortlist_rows(self) -> list[str]:
        return [m for m in self.choice.methods if m in SHORTLIST_METHODS]

    def initial(self) -> tuple[np.ndarray, np.ndarray]:
        """The features' ranking (ranks (Q, N), scores (Q, N)), computed once."""
        if self._initial is None:
            self._initial = ranking(self.query, self.db)
        return self._initial

    def neighbours(self) -> CandidateNeighbours | None:
        """The candidate neighbours serving every shortlist row at its chosen point, computed once."""
        if self._neighbours is None:
            names = self.shortlist_rows
            points = {m: [self.choice.point_for(m)] for m in names}
            found = _shortlist_neighbours(names, self.db, self.initial()[0], points, self.search) if names else None
            self._neighbours = (found,)
        return self._neighbours[0]

    def method(self, name: str) -> MethodRanking:
        """The row ``name`` at its chosen setting."""
        query, db, choice = self.query, self.db, self.choice
        ranks, scores = self.initial()
        if name == "features":
            return MethodRanking("features", query, ranks, scores)
        if name in dict(QE_METHODS):
            q2 = expanded_query(name, query, db, ranks, choice.n_for(name), self.search)
            r2, s2 = ranking(q2, db)
            return MethodRanking(name, q2, r2, s2)
        if name == "k-reciprocal":
            if choice.krecip is None:
                raise ValueError("method_rankings: k-reciprocal is a row but the choice has no k-reciprocal point")
            r3, s3 = krecip_ranking(query, db, choice.krecip, initial=(ranks, scores), search=self.search)
            return MethodRanking("k-reciprocal", query, r3, s3)
        if name in SHORTLIST_METHODS:
            return _shortlist_ranking(name, query, db, ranks, scores, self.neighbours(), choice.point_for(name))
        raise ValueError(f"methods: unknown method {name!r} (known: {', '.join(RETRIEVAL_METHODS)})")


def method_rankings(
    query: np.ndarray,
    db: np.ndarray,
    choice: BaselineChoice,
    search: NeighbourSearch | None = None,
    normalised: bool = False,
) -> list[MethodRanking]:
    """Initial rankings of the chosen rows (``choice.methods``) at the chosen settings. query (Q, D), db (N, D).
    search: the database searches of the re-rankers (default: in this process; an actor
    pool, ``ray_jobs.CandidateSearchPool``, spreads them). All rows are held at once: the
    pipeline computes them one at a time instead (``RankingSession``). Memory: see the module docstring."""
    session = RankingSession(query, db, choice, search, normalised)
    return [session.method(m) for m in choice.methods]


def write_ranking_store(out_dir: Path, m: MethodRanking, k_store: int, shard_size: int, source: str) -> SimilarityStore:
    """The top-``k_store`` of a method's ranking as a similarity store (query ids 0..Q-1)."""
    Q = len(m.ranks)
    n_shards = max(1, -(-Q // shard_size))
    store = create_store(out_dir, k_store, Q, n_shards, shard_size, {"source": source, "method": m.name})
    for i in store.pending_shards():
        s, e = i * shard_size, min(Q, (i + 1) * shard_size)
        info = store.write_shard(
            i,
            np.arange(s, e, dtype=np.int64),
            m.ranks[s:e, :k_store].astype(np.int64),
            m.scores[s:e, :k_store].astype(np.float32),
        )
        store.mark_complete(i, info)
    return store


def read_ranks(ranks_dir: str | Path, name: str) -> np.ndarray:
    """A method's initial (Q, N) ranks as the ranking step wrote them (``ranks/<method>.npy``), memory-mapped."""
    path = Path(ranks_dir) / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ranking of method {name!r} (expected the ranking step's output)")
    return np.load(path, mmap_mode="r")


def ranks_after_rerank(store_dir: Path, initial: np.ndarray) -> np.ndarray:
    """Full (Q, N) ranking: the store's (re-ranked) top-K first, then the rest in initial order."""
    ranks = initial.copy()
    for shard in SimilarityStore(store_dir).iter_shards():
        for q, top in zip(shard.query_ids, shard.neighbor_ids):
            K = len(top)
            ranks[q, :K] = top
            # items beyond the top-K keep their original order
    return ranks


def map_row(name: str, ranks: np.ndarray, gnd: list[dict]) -> dict:
    """A results-table row: revisited mAP (Easy / Medium / Hard) and mP@10 of ranks (Q, N)."""
    res = revisited_map(ranks, gnd)
    return {
        "method": name,
        **{f"mAP {p}": round(res[p]["map"], 2) for p in ("easy", "medium", "hard")},
        **{f"mP@10 {p}": round(res[p]["mp"][10], 2) for p in ("medium", "hard")},
    }
