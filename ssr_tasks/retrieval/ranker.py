"""The ranking step of the retrieval pipeline, run once in a Ray actor, its cost measured as it runs.

``rank_methods`` (``ssr_tasks.retrieval.tasks``) writes the test database once as an
L2-normalised float32 ``.npy`` (``write_database_npy``, streamed from the features table
block by block), then hands it to one ``MethodRanker`` actor, which memory-maps it and
computes the rows of the results table one at a time (``evaluate.RankingSession``): each
row's (Q, N) ranking is written (its top-K store, its query nodes, its ranks as an int32
``.npy``) and dropped before the next row, so no process holds the database or more than
two rankings, whatever N. The same memory map serves the re-ranking actors
(``rerank.ShardReranker``) and the val-vs-test scoring: the features table is read once.

Costs: the call that produces a row is the pipeline's own call, measured once (no second
run): wall and CPU seconds, and the peak of the allocations it made (tracemalloc, which
sees numpy's and Python's allocations; the retrieval rows allocate through numpy, faiss and
scipy; faiss' and BLAS' scratch memory freed inside a call is not seen). Tracing slows a
call that makes many small allocations: on the demo's data (5,000 x 256, 70 queries, one
thread, each row traced and untraced) the table's CPU total rose 1-10 %, DQE's and diffusion's calls up to
2x (0.1-0.2 s); a second, untraced call would cost the whole table again. A row's cost adds
the shared stages it needs: the initial ranking (every row) and the candidate-neighbour
search of the shortlist re-rankers (those rows; one search at the widest point serves them
all, so each of them is charged that whole search). Times add up; the peak is the largest
of each stage's peak plus what the stages before it still hold. The actor takes one CPU,
so the numbers are one core's; with a candidate-search pool (``evaluation.n_search_actors``)
the pool's CPU time is not in the CPU seconds (the wall time includes it).

A rerun resumes: a row whose store, query table, ranks and cost file exist is not recomputed.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssr_tasks.retrieval.evaluate import BaselineChoice, RankingSession, write_ranking_store
from ssr_tasks.retrieval.handoffs import MethodStore, RetrievalCost
from storage.features import iter_embeddings, read_metadata, write_features
from storage.simstore import SimilarityStore

DATABASE_NPY = "database.npy"
RANKS_DIR = "ranks"
COST_JSON = "cost.json"


def write_database_npy(
    features_path: str | Path, out: Path, n_database: int, dim: int, block_rows: int = 65_536
) -> Path:
    """The rows of split 'database' of a features table, in table order, L2-normalised, as an
    (n_database, dim) float32 ``.npy`` (memory-mappable), streamed block by block (memory: one
    block) to a temporary name, then renamed. An existing file of that shape is kept."""
    out = Path(out)
    if out.is_file():
        found = np.load(out, mmap_mode="r")
        if found.shape == (n_database, dim) and found.dtype == np.float32:
            return out
        raise ValueError(
            f"{out}: database of shape {found.shape} {found.dtype}, expected ({n_database}, {dim}) float32"
        )
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_database, dim))
    row = 0
    try:
        for _, emb in iter_embeddings(features_path, block_rows, split="database", expected_dim=dim, normalise=True):
            if row + len(emb) > n_database:
                raise ValueError(f"{features_path}: split 'database' has more than the {n_database} rows expected")
            mm[row : row + len(emb)] = emb
            row += len(emb)
        if row != n_database:
            raise ValueError(f"{features_path}: split 'database' has {row} rows, expected {n_database}")
        mm.flush()
        del mm
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_queries(features_path: str | Path, dim: int) -> np.ndarray:
    """The rows of split 'query' (Q, D) float32, as extracted (the queries are few)."""
    blocks = [emb for _, emb in iter_embeddings(features_path, 65_536, split="query", expected_dim=dim)]
    return np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)


@dataclass(frozen=True)
class StageCost:
    """One measured call: wall and CPU seconds, the peak bytes it allocated above its start,
    and the bytes still allocated by it when it returned (what later stages see held)."""

    seconds: float
    cpu_seconds: float
    peak_bytes: float
    retained_bytes: float


ZERO = StageCost(0.0, 0.0, 0.0, 0.0)


@contextmanager
def measured() -> Iterator[list[StageCost]]:
    """Times the block and traces its allocations; the list holds its ``StageCost`` after."""
    out: list[StageCost] = []
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        current, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
        out.append(StageCost(seconds, cpu, float(max(0, peak - base)), float(max(0, current - base))))


def compose(name: str, stages: Sequence[StageCost], n_queries: int) -> RetrievalCost:
    """A row's cost from the stages it needs, in order: times add up; the peak is the largest
    stage peak plus what the stages before it retain."""
    held, peak = 0.0, 0.0
    for s in stages:
        peak = max(peak, held + s.peak_bytes)
        held += s.retained_bytes
    seconds = sum(s.seconds for s in stages)
    return RetrievalCost(
        name, 1000 * seconds / max(1, n_queries), peak / 2**20, sum(s.cpu_seconds for s in stages), n_queries
    )


@dataclass(frozen=True)
class RankedRow:
    """What the ranking step gives back for one row: its store and query nodes, its (Q, N)
    ranks file (int32 ``.npy``) and its cost."""

    store: MethodStore
    ranks: str
    cost: RetrievalCost


class MethodRanker:
    """Plain class behind the ranking actor: the queries (read once) and the database
    (memory-mapped ``.npy`` of ``write_database_npy``).

    threads: BLAS threads of this process (1 in the actor: one CPU's cost; None: as it has).
    """

    def __init__(self, features_path: str, database_npy: str, dim: int, threads: int | None = 1):
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(threads) if threads else None
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.features_path = features_path
        self.database_npy = database_npy
        self.query = read_queries(features_path, dim)
        self.db = np.load(database_npy, mmap_mode="r")

    def rank(
        self, choice: BaselineChoice, stores: str, k_store: int, shard_size: int, n_search_actors: int = -1
    ) -> list[RankedRow]:
        """Every row of ``choice.methods`` into ``stores``: ``<method>/topk`` (top-``k_store``,
        shards of ``shard_size`` queries), ``queries-<method>.parquet``, ``ranks/<method>.npy``,
        ``<method>/cost.json``; rows already complete are read back, not recomputed."""
        from ssr_tasks.retrieval.ray_jobs import candidate_search

        out_dir = Path(stores)
        (out_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        metadata = read_metadata(Path(self.features_path))
        meta = {k: metadata[k] for k in ("dataset", "backbone", "checkpoint_hash") if k in metadata}
        Q = len(self.query)
        rows: dict[str, RankedRow] = {}
        todo = []
        for name in choice.methods:
            done = _read_row(out_dir, name)
            if done is None:
                todo.append(name)
            else:
                rows[name] = done
        if todo:
            with candidate_search(self.database_npy, n_search_actors) as pool:
                session = RankingSession(self.query, self.db, choice, search=pool, normalised=True)
                with measured() as initial:
                    session.initial()
                neighbours = [ZERO]
                if any(m in session.shortlist_rows for m in todo):
                    with measured() as found:
                        session.neighbours()
                    neighbours = found
                for name in todo:
                    with measured() as own:
                        m = session.method(name)
                    stages = [initial[0], *(neighbours if name in session.shortlist_rows else []), own[0]]
                    cost = compose(name, stages, Q)
                    rows[name] = _write_row(out_dir, m, k_store, shard_size, self.features_path, meta, cost)
                    del m
        return [rows[name] for name in choice.methods]

    def score_test(self, baselines, gnd_path: str) -> tuple[tuple[str, float], ...]:
        """Every grid point of ``baselines`` scored on the test queries (``validation.score_on_test``),
        on this actor's memory-mapped database."""
        from ssr_tasks.retrieval.validation import score_on_test
        from storage.landmarks import read_gnd

        return score_on_test(self.query, self.db, read_gnd(Path(gnd_path)).gnd, baselines, normalised=True)


def _row_paths(out_dir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    return (
        out_dir / name / "topk",
        out_dir / f"queries-{name}.parquet",
        out_dir / RANKS_DIR / f"{name}.npy",
        out_dir / name / COST_JSON,
    )


def _read_row(out_dir: Path, name: str) -> RankedRow | None:
    topk, queries, ranks, cost = _row_paths(out_dir, name)
    if not (cost.is_file() and ranks.is_file() and queries.is_file() and topk.is_dir()):
        return None
    if SimilarityStore(topk).pending_shards():
        return None
    return RankedRow(
        MethodStore(name, str(topk), str(queries)), str(ranks), RetrievalCost(**json.loads(cost.read_text()))
    )


def _write_row(out_dir, m, k_store: int, shard_size: int, source: str, meta: dict, cost: RetrievalCost) -> RankedRow:
    topk, queries, ranks, cost_path = _row_paths(out_dir, m.name)
    write_features(
        queries,
        ids=np.arange(len(m.query)),
        labels=["query"] * len(m.query),
        splits=["query"] * len(m.query),
        embeddings=m.query.astype(np.float32),
        metadata={**meta, "method": m.name},
    )
    store = write_ranking_store(topk, m, k_store, shard_size, source=source)
    tmp = ranks.with_name(f".{ranks.stem}.tmp.npy")
    np.save(tmp, m.ranks.astype(np.int32 if m.ranks.shape[1] < 2**31 else np.int64))
    os.replace(tmp, ranks)
    tmp_cost = cost_path.with_name(f".{cost_path.name}.tmp")
    tmp_cost.write_text(json.dumps(asdict(cost)))
    os.replace(tmp_cost, cost_path)  # written last: the row is complete
    return RankedRow(MethodStore(m.name, str(store.path), str(queries)), str(ranks), cost)


def rank_in_actor(
    features,
    database_npy: str,
    choice: BaselineChoice,
    stores: str,
    k_store: int,
    shard_size: int,
    n_search_actors: int = -1,
    score_baselines=None,
) -> tuple[list[RankedRow], tuple[tuple[str, float], ...] | None]:
    """``MethodRanker.rank`` in a fresh Ray actor of one CPU (in this process when Ray is not
    running, as when a task is called alone in unit tests); with ``score_baselines`` (the
    baselines group) also every grid point scored on the test queries by the same actor.
    features: the ``RetrievalFeatures`` hand-off (its table, width and ground truth)."""
    import ray  # lazy: Ray is heavy and only needed where the ranking runs as an actor

    if not ray.is_initialized():
        ranker = MethodRanker(features.path, database_npy, features.dim, threads=None)
        rows = ranker.rank(choice, stores, k_store, shard_size, n_search_actors)
        test = ranker.score_test(score_baselines, features.gnd) if score_baselines is not None else None
        return rows, test
    actor: Any = ray.remote(MethodRanker).options(num_cpus=1).remote(features.path, database_npy, features.dim, 1)
    try:
        rows_ref = actor.rank.remote(choice, stores, k_store, shard_size, n_search_actors)
        test_ref = actor.score_test.remote(score_baselines, features.gnd) if score_baselines is not None else None
        return ray.get(rows_ref), (ray.get(test_ref) if test_ref is not None else None)
    finally:
        ray.kill(actor)
