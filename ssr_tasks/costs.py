"""What a method call costs, measured where it runs (a Ray actor): wall and CPU seconds and the
peak memory of one call. Shared by the few-shot track (episodes) and the retrieval track
(queries: ``n_episodes`` then counts the queries of the call).
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


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
