"""What SSR's re-ranking costs in the retrieval track (issue 20 item 1), measured in a Ray actor.

The rows' own costs are measured where they are computed, on the pipeline's own call
(``ssr_tasks.retrieval.ranker``). SSR's cost is measured here, once per run, on every row's
top-K store: ``CostProbe.ssr`` times ``ShardReranker.rerank_arrays`` on all the queries of a
store, the call the re-ranking actors make, with ``ssr_tasks.costs``: wall and CPU seconds of
the call, then its peak memory in a second, profiled call on the same input
(``peak_bytes_of_call``: torch's allocations through the profiler, numpy's and Python's
through tracemalloc; the profiler would slow the timed call). The probe takes one CPU, so the
numbers are one core's; it reads the database rows of the stores' neighbours only (the
pipeline's memory-mapped ``database.npy``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_tasks.costs import MethodCost, measure_cost, peak_bytes_of_call
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
    """Measures SSR's re-ranking calls. threads: torch's threads in this process (1 in the actor: one CPU's cost)."""

    def __init__(self, threads: int | None = 1, device: str = "cpu"):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)

    def _measure(self, fn, n_queries: int) -> MethodCost:
        with measure_cost(self.device, n_queries) as m:
            fn()
        cost = m.cost
        assert cost is not None  # set on exit
        if self.device.type != "cuda":  # on CUDA the timed call measured its peak already
            cost = replace(cost, peak_bytes=peak_bytes_of_call(fn, self.device), peak_episodes=n_queries)
        return cost

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


def _ray_running() -> bool:
    import ray  # lazy: Ray is heavy and only needed where the probe runs as an actor

    return ray.is_initialized()


def measure_ssr(
    stores: Sequence[tuple[str, str, str]],
    model: RetrievalModel | RegisteredRetrievalModel,
    db_table: str,
    device: str = "cpu",
) -> tuple[RetrievalCost, ...]:
    """SSR's re-ranking of each method's top-K store, stores: (method, top-K store, its query
    table); measured one after another in one fresh Ray actor (in this process when Ray is not running)."""
    import ray  # lazy: as in _ray_running

    if not _ray_running():
        probe = CostProbe(threads=None, device=device)
        return tuple(probe.ssr(name, model, store, queries, db_table) for name, store, queries in stores)
    use_gpu = device == "cuda"
    actor: Any = ray.remote(CostProbe).options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(1, device)
    try:
        return tuple(ray.get([actor.ssr.remote(n, model, s, q, db_table) for n, s, q in stores]))
    finally:
        ray.kill(actor)
