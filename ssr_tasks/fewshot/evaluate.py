"""Few-shot evaluation of baseline, k-reciprocal, SSR and the peer methods on episodes (plain code).

``FewShotEvaluator`` is what a Ray actor wraps: it loads the split's features and the
model once, then scores chunks of episodes. Accuracies come back per episode (fractions),
so the driver computes mean and 95% interval over all episodes. Each method's call on a
chunk is timed and its peak memory measured there, in the actor (``MethodCost``).
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model.baselines import fewshot_k_reciprocal, peer_method
from ssr_tasks.fewshot.episodes import EpisodeIndices, gather, load_split
from ssr_tasks.fewshot.handoffs import FewShotModel, KReciprocal

T = TypeVar("T")


def baseline_scores(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine to prototypes. support (E, n_way, n_shot, D), query (E, n_query, D) -> (E, n_query, n_way)."""
    protos = F.normalize(support.mean(2), dim=-1, eps=1e-12)
    return F.normalize(query, dim=-1, eps=1e-12) @ protos.transpose(1, 2)


def krecip_accuracy(
    support: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, params: KReciprocal
) -> np.ndarray:
    """Per-episode accuracy (E,) of k-reciprocal re-ranking (queries vs prototypes).

    support (E, n_way, n_shot, D), query (E, n_query, D), labels (E, n_query).
    """
    protos = support.mean(2).cpu().numpy()
    q = query.cpu().numpy()
    lab = labels.cpu().numpy()
    accs = np.empty(len(q))
    for e in range(len(q)):
        dist = np.asarray(fewshot_k_reciprocal(protos[e], q[e], k1=params.k1, k2=params.k2, lambda_value=params.lam))
        accs[e] = float((dist.argmin(1) == lab[e]).mean())
    return accs


# Episodes per evaluator call: the chunk of ``ray_jobs.evaluate_with_pool`` (its default), so the
# E of the results table's "peak MiB (E=...)" column when there are at least that many episodes.
EPISODES_PER_CALL = 50


@dataclass(frozen=True)
class MethodCost:
    """What one method cost on some episodes: wall seconds of its calls (scores only, not
    the gathering of features), the process's CPU seconds during them (less sensitive to
    other load on the machine; above the wall time when a call uses several threads), and
    the peak memory of one call: ``peak_bytes`` allocated by a call on ``peak_episodes``
    episodes (the largest measured call; 0 episodes and NaN bytes when none was measured).

    Peak memory is the peak of the allocations the call made, above what was allocated when
    it started (``peak_bytes_of_call``): on CUDA ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``, every call; on CPU torch's allocations as the torch profiler
    records them plus Python/numpy allocations as tracemalloc does, measured in a second,
    profiled call on the same batch (the profiler slows a call, so the timed call runs
    without it), once per method and evaluator (again only for a larger batch).
    """

    seconds: float
    n_episodes: int
    peak_bytes: float = math.nan
    cpu_seconds: float = math.nan
    peak_episodes: int = 0

    @property
    def ms_per_episode(self) -> float:
        return 1000 * self.seconds / max(1, self.n_episodes)

    @property
    def cpu_ms_per_episode(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.n_episodes)

    @property
    def peak_mib(self) -> float:
        """MiB allocated at the peak of one call on ``peak_episodes`` episodes (not divided by them)."""
        return self.peak_bytes / 2**20

    @property
    def peak_mib_per_episode(self) -> float:
        """The name ``MethodCostRow`` and the MLflow metric ``test_<shot>shot_<method>_peak_mib_per_episode``
        still use: the same value as ``peak_mib``, one call's peak on ``peak_episodes`` episodes."""
        return self.peak_mib

    @staticmethod
    def merge(costs: Sequence[MethodCost]) -> MethodCost:
        """Times and episodes add up; the peak is the one of the largest measured call (then the highest)."""
        measured = [c for c in costs if c.peak_episodes > 0 and not math.isnan(c.peak_bytes)]
        top = max(measured, key=lambda c: (c.peak_episodes, c.peak_bytes), default=None)
        return MethodCost(
            sum(c.seconds for c in costs),
            sum(c.n_episodes for c in costs),
            top.peak_bytes if top else math.nan,
            sum(c.cpu_seconds for c in costs),
            top.peak_episodes if top else 0,
        )


def _profiler_peak_bytes(prof: torch.profiler.profile) -> float:
    """Peak of the running sum of the allocations (+) and frees (-) a CPU profile recorded.

    Reads the allocator's records ("[memory]" events, nanosecond times) from the profile's
    results when they are there; otherwise the parsed events, an op's own allocations net of
    its own frees at its start (op granularity, and parsing is slow: 200,000 events for
    TIM's 1,000 steps take a minute).
    """
    results = getattr(prof.profiler, "kineto_results", None) if prof.profiler is not None else None
    if results is not None:
        records = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    else:
        records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return float(peak)


def peak_bytes_of_call(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, less the allocated bytes
    before. CPU: the peak of torch's allocations recorded by ``torch.profiler`` (profile_memory)
    plus the peak of those tracemalloc sees (Python objects and numpy arrays; torch's CPU
    allocator is invisible to it, so nothing is counted twice). A sum of two peaks: an upper
    bound of the joint peak, which is one of them for a method that allocates through one
    library (every method here). Scratch memory a single op frees before returning is not seen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    started = not tracemalloc.is_tracing()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        if started:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            fn()
            python_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if started:
                tracemalloc.stop()
    return _profiler_peak_bytes(prof) + max(0, python_peak)


class measure_cost:
    """Context manager timing a call on ``n_episodes`` episodes; ``.cost`` after. On CUDA it
    measures the call's peak memory too (``peak_bytes_of_call``); on CPU the cost has no peak."""

    def __init__(self, device: torch.device, n_episodes: int):
        self.device, self.n_episodes = device, n_episodes
        self.cost: MethodCost | None = None

    def __enter__(self) -> measure_cost:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.alloc_before = torch.cuda.memory_allocated(self.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start
        if self.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(self.device) - self.alloc_before)
            self.cost = MethodCost(seconds, self.n_episodes, peak, cpu_seconds, self.n_episodes)
        else:
            self.cost = MethodCost(seconds, self.n_episodes, math.nan, cpu_seconds)


def krecip_key(params: KReciprocal) -> str:
    """The cost key of a k-reciprocal setting in ``EpisodeScores.cost``."""
    return f"krecip {params.label}"


@dataclass
class EpisodeScores:
    """Per-episode accuracies (E,) of each method on a batch of episodes.

    krecip: one array per k-reciprocal setting; ssr_by_step: SSR after 0..steps refinements
    (empty without a model or with ``with_ssr=False``); peers: by peer method name
    (``ssr_model.baselines.PEER_METHODS``); cost: by "baseline", ``krecip_key(params)``,
    "ssr" (one call computes every step) and peer name.
    """

    baseline: np.ndarray
    krecip: dict[KReciprocal, np.ndarray] = field(default_factory=dict)
    ssr_by_step: list[np.ndarray] = field(default_factory=list)
    peers: dict[str, np.ndarray] = field(default_factory=dict)
    cost: dict[str, MethodCost] = field(default_factory=dict)

    @staticmethod
    def merge(chunks: Sequence[EpisodeScores]) -> EpisodeScores:
        """Concatenate the episodes of chunks scored separately, in order; costs add up."""
        first = chunks[0]
        return EpisodeScores(
            np.concatenate([c.baseline for c in chunks]),
            {p: np.concatenate([c.krecip[p] for c in chunks]) for p in first.krecip},
            [np.concatenate([c.ssr_by_step[s] for c in chunks]) for s in range(len(first.ssr_by_step))],
            {m: np.concatenate([c.peers[m] for c in chunks]) for m in first.peers},
            {k: MethodCost.merge([c.cost[k] for c in chunks]) for k in first.cost},
        )


class FewShotEvaluator:
    """Scores episodes of one split with a trained FewShotSSR (loaded once), or without a model."""

    def __init__(
        self,
        features_path: str,
        split: str,
        model: FewShotModel | None,
        device: str = "cpu",
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.features_path = Path(features_path)
        self.split = load_split(self.features_path, split, expected_dim=model.feat_dim if model else None)
        self.model = model.build().to(self.device) if model is not None else None
        self._base_mean: torch.Tensor | None = None
        self._peak_measured: dict[str, int] = {}  # cost key -> episodes of the call whose CPU peak was measured

    def base_mean(self) -> torch.Tensor:
        """Mean feature of the base (train) split, (D,): the centring of SimpleShot and LaplacianShot; read once."""
        if self._base_mean is None:
            train = load_split(self.features_path, "train", expected_dim=self.split.dim)
            self._base_mean = torch.from_numpy(train.embeddings.mean(0)).to(self.device)
        return self._base_mean

    def _cost(self, key: str, n_episodes: int, fn: Callable[[], T]) -> tuple[T, MethodCost]:
        """fn() timed; its peak memory measured on CUDA in the same call, on CPU by a second,
        profiled call the first time this evaluator runs ``key`` on that many episodes or more."""
        with measure_cost(self.device, n_episodes) as m:
            out = fn()
        cost = m.cost
        assert cost is not None  # set on exit
        if self.device.type != "cuda" and n_episodes > self._peak_measured.get(key, 0):
            cost = replace(cost, peak_bytes=peak_bytes_of_call(fn, self.device), peak_episodes=n_episodes)
            self._peak_measured[key] = n_episodes
        return out, cost

    @torch.no_grad()
    def evaluate(
        self,
        episodes: EpisodeIndices,
        krecip: Sequence[KReciprocal] = (),
        with_ssr: bool = True,
        peers: Sequence[str] = (),
    ) -> EpisodeScores:
        """Accuracies and costs on a batch; peers: names in ``ssr_model.baselines.PEER_METHODS``."""
        support, query, labels = gather(self.split, episodes, self.device)
        E = len(episodes)

        def acc(scores: torch.Tensor) -> np.ndarray:
            return (scores.argmax(-1) == labels).float().mean(-1).cpu().numpy()

        scores, cost = self._cost("baseline", E, lambda: baseline_scores(support, query))
        out = EpisodeScores(acc(scores), cost={"baseline": cost})
        for params in krecip:
            key = krecip_key(params)
            out.krecip[params], out.cost[key] = self._cost(
                key, E, partial(krecip_accuracy, support, query, labels, params)
            )
        if with_ssr and self.model is not None:
            model = self.model
            per_step, out.cost["ssr"] = self._cost("ssr", E, lambda: model(support, query, return_all_steps=True))
            out.ssr_by_step = [acc(scores) for scores in per_step]
        for name in peers:
            method = peer_method(name)
            method.check(support.shape[1], support.shape[2], query.shape[1])
            base_mean = self.base_mean() if method.centres_on_base else None
            scores, out.cost[name] = self._cost(name, E, partial(method.score, support, query, base_mean))
            out.peers[name] = acc(scores)
        return out
