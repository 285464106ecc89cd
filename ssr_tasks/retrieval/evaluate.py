"""Retrieval evaluation: baseline settings chosen on validation, initial rankings per method,
stores for re-ranking, revisited mAP.

Methods: features only, AQE, AQEwD, alpha-QE, DQE and k-reciprocal; each is also
followed by SSR on its top-k (the SSR query node is the expanded query for QE methods).
QE's n (per QE method) and the k-reciprocal (k1, k2, lambda) are chosen on the validation
set (held-out training clusters), by the medium-protocol mAP of the baseline itself, from
the paper's grids; the test queries are never used for a choice. Queries are few (tens),
so their full rankings are held in memory; the re-ranking itself goes through Parquet
stores and the actor pool like any large job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ssr_model.baselines import KReciprocalPoint, alpha_qe, aqe, aqe_wd, best_point, dqe, k_reciprocal
from ssr_model.metrics import revisited_map
from ssr_tasks.retrieval.train import ValidationSet
from storage.simstore import SimilarityStore, create_store

QE_METHODS: tuple[tuple[str, Callable], ...] = (("AQE", aqe), ("AQEwD", aqe_wd), ("alpha-QE", alpha_qe), ("DQE", dqe))


@dataclass(frozen=True)
class MethodRanking:
    """query (Q, D) features used as SSR's query node; ranks (Q, N) db indices best first; scores (Q, N)."""

    name: str
    query: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class BaselineChoice:
    """The settings chosen on validation: QE's n per QE method, the k-reciprocal point, and
    the validation mAP (medium, percent) of every setting tried, by ``"<method> <setting>"``."""

    qe_n: tuple[tuple[str, int], ...]
    krecip: KReciprocalPoint
    val_map: tuple[tuple[str, float], ...]

    def n_for(self, method: str) -> int:
        return dict(self.qe_n)[method]

    def as_params(self) -> dict[str, str]:
        """Flat ``chosen.*`` entries for the tracker and the log."""
        return {**{f"chosen.qe_n.{m}": str(n) for m, n in self.qe_n}, "chosen.krecip": self.krecip.label()}


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranking(query: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = query @ db.T
    ranks = np.argsort(-sims, axis=1, kind="stable")
    return ranks, np.take_along_axis(sims, ranks, axis=1)


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)).astype(np.float32)


def krecip_ranking(query: np.ndarray, db: np.ndarray, point: KReciprocalPoint) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal ranking of L2-normalised query (Q, D) against db (N, D): (ranks, -distances)."""
    final = np.asarray(k_reciprocal(_distance(query, db), _distance(query, query), _distance(db, db),
                                    k1=point.k1, k2=point.k2, lambda_value=point.lambda_value))
    ranks = np.argsort(final, axis=1, kind="stable")
    return ranks, -np.take_along_axis(final, ranks, axis=1)


def _medium_map(ranks: np.ndarray, gnd: list[dict]) -> float:
    return revisited_map(ranks, gnd)["medium"]["map"]


def choose_baselines(val: ValidationSet, qe_grid: Sequence[int], krecip_points: Sequence[KReciprocalPoint]) -> BaselineChoice:
    """QE's n (per QE method) and the k-reciprocal point with the best validation mAP."""
    q, db, ranks = val.queries, val.database, val.initial
    tried: list[tuple[str, float]] = []
    qe_n = []
    for name, fn in QE_METHODS:
        grid = [n for n in qe_grid if name != "DQE" or 2 * (n + 1) <= ranks.shape[1] + 1]
        scores = [_medium_map(ranking(_normalise(np.asarray(fn(q, db, ranks, n), np.float32)), db)[0], val.gnd) for n in grid]
        tried += [(f"{name} n={n}", s) for n, s in zip(grid, scores)]
        qe_n.append((name, best_point(grid, scores)[0]))
    scores = [_medium_map(krecip_ranking(q, db, p)[0], val.gnd) for p in krecip_points]
    tried += [(f"k-reciprocal {p.label()}", s) for p, s in zip(krecip_points, scores)]
    return BaselineChoice(tuple(qe_n), best_point(list(krecip_points), scores)[0], tuple(tried))


def method_rankings(query: np.ndarray, db: np.ndarray, choice: BaselineChoice) -> list[MethodRanking]:
    """Initial rankings of every baseline at the chosen settings. query (Q, D), db (N, D)."""
    query, db = _normalise(query), _normalise(db)
    ranks, scores = ranking(query, db)
    out = [MethodRanking("features", query, ranks, scores)]
    for name, fn in QE_METHODS:
        q2 = _normalise(np.asarray(fn(query, db, ranks, choice.n_for(name)), dtype=np.float32))
        r2, s2 = ranking(q2, db)
        out.append(MethodRanking(name, q2, r2, s2))
    r3, s3 = krecip_ranking(query, db, choice.krecip)
    out.append(MethodRanking("k-reciprocal", query, r3, s3))
    return out


def write_ranking_store(out_dir: Path, m: MethodRanking, k_store: int, shard_size: int, source: str) -> SimilarityStore:
    """The top-``k_store`` of a method's ranking as a similarity store (query ids 0..Q-1)."""
    Q = len(m.ranks)
    n_shards = max(1, -(-Q // shard_size))
    store = create_store(out_dir, k_store, Q, n_shards, shard_size, {"source": source, "method": m.name})
    for i in store.pending_shards():
        s, e = i * shard_size, min(Q, (i + 1) * shard_size)
        info = store.write_shard(i, np.arange(s, e, dtype=np.int64), m.ranks[s:e, :k_store].astype(np.int64),
                                 m.scores[s:e, :k_store].astype(np.float32))
        store.mark_complete(i, info)
    return store


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
    return {"method": name, **{f"mAP {p}": round(res[p]["map"], 2) for p in ("easy", "medium", "hard")},
            **{f"mP@10 {p}": round(res[p]["mp"][10], 2) for p in ("medium", "hard")}}
