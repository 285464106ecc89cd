"""Retrieval evaluation: initial rankings per method, stores for re-ranking, revisited mAP.

Methods: features only, AQE, AQEwD, alpha-QE, DQE and k-reciprocal; each is also
followed by SSR on its top-k (the SSR query node is the expanded query for QE methods).
Queries are few (tens), so their full rankings are held in memory; the re-ranking itself
goes through Parquet stores and the actor pool like any large job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssr_model.baselines import aqe, aqe_wd, alpha_qe, dqe, k_reciprocal
from ssr_model.metrics import revisited_map
from storage.simstore import SimilarityStore, create_store


@dataclass(frozen=True)
class MethodRanking:
    """query (Q, D) features used as SSR's query node; ranks (Q, N) db indices best first; scores (Q, N)."""

    name: str
    query: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranking(query: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = query @ db.T
    ranks = np.argsort(-sims, axis=1, kind="stable")
    return ranks, np.take_along_axis(sims, ranks, axis=1)


def method_rankings(query: np.ndarray, db: np.ndarray, qe_n: int, krecip=(20, 6, 0.3)) -> list[MethodRanking]:
    """Initial rankings of every baseline. query (Q, D), db (N, D), both L2-normalised."""
    query, db = _normalise(query), _normalise(db)
    ranks, scores = ranking(query, db)
    out = [MethodRanking("features", query, ranks, scores)]
    for name, fn in (("AQE", aqe), ("AQEwD", aqe_wd), ("alpha-QE", alpha_qe), ("DQE", dqe)):
        q2 = _normalise(np.asarray(fn(query, db, ranks, qe_n), dtype=np.float32))
        r2, s2 = ranking(q2, db)
        out.append(MethodRanking(name, q2, r2, s2))
    dist = lambda a, b: np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)).astype(np.float32)
    k1, k2, lam = krecip
    final = np.asarray(k_reciprocal(dist(query, db), dist(query, query), dist(db, db), k1=k1, k2=k2, lambda_value=lam))
    r3 = np.argsort(final, axis=1, kind="stable")
    out.append(MethodRanking("k-reciprocal", query, r3, -np.take_along_axis(final, r3, axis=1)))
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
