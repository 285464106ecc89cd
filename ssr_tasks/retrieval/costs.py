"""What each retrieval method costs (issue 20 item 1, issue 21 item 5), measured in a Ray actor.

``CostProbe`` is the plain class behind the actor: it loads the test queries and database
once, then times one call of a method on all the queries with ``ssr_tasks.costs``: wall and
CPU seconds of the call, then its peak memory (``peak_bytes_of_call``: the allocations the
call made above what it started with, torch's through the profiler and numpy's / Python's
through tracemalloc) in a second, profiled call on the same input. A method is one row of
``method_rankings`` (its initial ranking at the chosen setting, full (Q, N) rankings as the
pipeline computes them); SSR's cost is ``ShardReranker.rerank_arrays`` on a method's top-K
store, the call the re-ranking actors make. One fresh actor measures every method (one
after another) and one measures SSR on every method's store; each takes one CPU, so the
numbers are one core's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr_tasks.costs import MethodCost, measure_cost, peak_bytes_of_call
from ssr_tasks.retrieval.evaluate import BaselineChoice, method_rankings
from ssr_tasks.retrieval.handoffs import RegisteredRetrievalModel, RetrievalCost, RetrievalModel
from ssr_tasks.retrieval.rerank import ShardReranker
from storage.features import read_features
from storage.simstore import SimilarityStore


def retrieval_cost(name: str, cost: MethodCost) -> RetrievalCost:
    """The hand-off of a measured call (``MethodCost.n_episodes`` counts queries here)."""
    return RetrievalCost(name, cost.ms_per_episode, cost.peak_mib, cost.cpu_seconds, cost.n_episodes)


def plus_ssr(method: RetrievalCost, ssr: RetrievalCost | None) -> RetrievalCost | None:
    """The cost of "<method> + SSR": the method's ranking then SSR on its top-k; times add up,
    the peak is the larger of the two calls' peaks. None when SSR's cost was not measured."""
    if ssr is None:
        return None
    peaks = [p for p in (method.peak_mib, ssr.peak_mib) if not math.isnan(p)]
    return RetrievalCost(
        f"{method.name} + SSR",
        method.ms_per_query + ssr.ms_per_query,
        max(peaks) if peaks else math.nan,
        method.cpu_seconds + ssr.cpu_seconds,
        method.n_queries,
    )


class CostProbe:
    """Measures calls on the test set of a features table (splits 'query' and 'database').

    threads: torch's threads in this process (1 in the actor: one CPU's cost)."""

    def __init__(self, features_path: str, threads: int | None = 1, device: str = "cpu"):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.query = read_features(Path(features_path), split="query").embeddings
        self.db = read_features(Path(features_path), split="database", expected_dim=self.query.shape[1]).embeddings

    def _measure(self, fn, n_queries: int) -> MethodCost:
        with measure_cost(self.device, n_queries) as m:
            fn()
        cost = m.cost
        assert cost is not None  # set on exit
        if self.device.type != "cuda":  # on CUDA the timed call measured its peak already
            cost = replace(cost, peak_bytes=peak_bytes_of_call(fn, self.device), peak_episodes=n_queries)
        return cost

    def method(self, choice: BaselineChoice, name: str) -> RetrievalCost:
        """One call of ``method_rankings`` for the row ``name`` alone, at the chosen setting."""
        one = replace(choice, methods=(name,))
        return retrieval_cost(name, self._measure(lambda: method_rankings(self.query, self.db, one), len(self.query)))

    def ssr(
        self, name: str, model: RetrievalModel | RegisteredRetrievalModel, store: str, queries: str, db_table: str
    ) -> RetrievalCost:
        """SSR re-ranking the top-K store of method ``name`` (its query nodes in ``queries``), one call
        on all its queries, as a re-ranking actor does (``ShardReranker.rerank_arrays``)."""
        reranker = ShardReranker(db_table, model, str(self.device), threads=None)
        shards = list(SimilarityStore(Path(store)).iter_shards())
        ids = np.concatenate([s.neighbor_ids for s in shards])
        scores = np.concatenate([s.scores for s in shards])
        order = np.argsort(np.concatenate([s.query_ids for s in shards]), kind="stable")
        table = read_features(Path(queries), expected_dim=model.feat_dim)
        qemb = F.normalize(torch.from_numpy(table.embeddings[np.argsort(table.ids, kind="stable")]), dim=-1, eps=1e-12)
        ids, scores = ids[order], scores[order]
        reranker.rerank_arrays(qemb[:1], ids[:1], scores[:1])  # warm-up: torch's first call initialises kernels
        cost = self._measure(lambda: reranker.rerank_arrays(qemb, ids, scores), len(ids))
        return retrieval_cost(f"{name} + SSR", cost)


def _actor(features_path: str, device: str):
    import ray  # lazy: Ray is heavy and only needed where the probe runs as an actor

    use_gpu = device == "cuda"
    return ray.remote(CostProbe).options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(features_path, 1, device)


def _ray_running() -> bool:
    import ray  # lazy: as in _actor

    return ray.is_initialized()


def measure_methods(features_path: str, choice: BaselineChoice, device: str = "cpu") -> tuple[RetrievalCost, ...]:
    """Each row of ``choice.methods`` measured in a fresh Ray actor (one for all rows, one after
    another); in this process when Ray is not running (a task called alone, as in unit tests)."""
    import ray  # lazy: as in _actor

    if not _ray_running():
        probe = CostProbe(features_path, threads=None, device=device)
        return tuple(probe.method(choice, m) for m in choice.methods)
    actor = _actor(features_path, device)
    try:
        return tuple(ray.get([actor.method.remote(choice, m) for m in choice.methods]))
    finally:
        ray.kill(actor)


def measure_ssr(
    features_path: str,
    stores: Sequence[tuple[str, str, str]],
    model: RetrievalModel | RegisteredRetrievalModel,
    db_table: str,
    device: str = "cpu",
) -> tuple[RetrievalCost, ...]:
    """SSR's re-ranking of each method's top-K store, stores: (method, top-K store, its query
    table); measured one after another in one fresh Ray actor (in this process when Ray is not running)."""
    import ray  # lazy: as in _actor

    if not _ray_running():
        probe = CostProbe(features_path, threads=None, device=device)
        return tuple(probe.ssr(name, model, store, queries, db_table) for name, store, queries in stores)
    actor = _actor(features_path, device)
    try:
        return tuple(ray.get([actor.ssr.remote(n, model, s, q, db_table) for n, s, q in stores]))
    finally:
        ray.kill(actor)
