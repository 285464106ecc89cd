"""Few-shot evaluation of baseline, k-reciprocal, SSR and the peer methods on episodes (plain code).

``FewShotEvaluator`` is what a Ray actor wraps: it loads the split's features and the
model once, then scores chunks of episodes. Accuracies come back per episode (fractions),
so the driver computes mean and 95% interval over all episodes. Each method's call on a
chunk is timed and its peak memory measured there, in the actor (``MethodCost``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model.baselines import fewshot_k_reciprocal, peer_method
from ssr_tasks.fewshot.episodes import EpisodeIndices, gather, load_split
from ssr_tasks.fewshot.handoffs import FewShotModel, KReciprocal


def baseline_scores(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine to prototypes. support (E, n_way, n_shot, D), query (E, n_query, D) -> (E, n_query, n_way)."""
    protos = F.normalize(support.mean(2), dim=-1, eps=1e-12)
    return F.normalize(query, dim=-1, eps=1e-12) @ protos.transpose(1, 2)


def krecip_accuracy(support: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, params: KReciprocal) -> np.ndarray:
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


@dataclass(frozen=True)
class MethodCost:
    """What one method cost on some episodes: wall seconds of its calls (scores only, not
    the gathering of features), the process's CPU seconds during them (less sensitive to
    other load on the machine; above the wall time when a call uses several threads), and
    the largest peak-memory growth per episode of a call.

    Peak memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` during the call;
    on CPU the growth of the process's peak RSS over its RSS before the call (Linux, the peak
    reset through /proc/self/clear_refs; NaN elsewhere), divided by the call's episodes.
    Memory the allocator reuses does not show, so CPU figures are lower bounds.
    """

    seconds: float
    n_episodes: int
    peak_bytes_per_episode: float
    cpu_seconds: float = math.nan

    @property
    def ms_per_episode(self) -> float:
        return 1000 * self.seconds / max(1, self.n_episodes)

    @property
    def cpu_ms_per_episode(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.n_episodes)

    @property
    def peak_mib_per_episode(self) -> float:
        return self.peak_bytes_per_episode / 2**20

    @staticmethod
    def merge(costs: Sequence["MethodCost"]) -> "MethodCost":
        return MethodCost(sum(c.seconds for c in costs), sum(c.n_episodes for c in costs),
                          max(c.peak_bytes_per_episode for c in costs), sum(c.cpu_seconds for c in costs))


def _proc_status_kib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


class measure_cost:
    """Context manager timing a call on ``n_episodes`` episodes and measuring its peak memory; ``.cost`` after."""

    def __init__(self, device: torch.device, n_episodes: int):
        self.device, self.n_episodes, self.cost = device, n_episodes, None

    def __enter__(self) -> "measure_cost":
        self.rss_before = math.nan
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.alloc_before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
                self.rss_before = _proc_status_kib("VmRSS")
            except OSError:
                pass
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start
        if self.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(self.device) - self.alloc_before)
        else:
            try:
                peak = max(0.0, _proc_status_kib("VmHWM") - self.rss_before) * 1024
            except OSError:
                peak = math.nan
        self.cost = MethodCost(seconds, self.n_episodes, peak / max(1, self.n_episodes), cpu_seconds)


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
    def merge(chunks: Sequence["EpisodeScores"]) -> "EpisodeScores":
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

    def __init__(self, features_path: str, split: str, model: FewShotModel | None, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.features_path = Path(features_path)
        self.split = load_split(self.features_path, split, expected_dim=model.feat_dim if model else None)
        self.model = model.build().to(self.device) if model is not None else None
        self._base_mean: torch.Tensor | None = None

    def base_mean(self) -> torch.Tensor:
        """Mean feature of the base (train) split, (D,): the centring of SimpleShot and LaplacianShot; read once."""
        if self._base_mean is None:
            train = load_split(self.features_path, "train", expected_dim=self.split.dim)
            self._base_mean = torch.from_numpy(train.embeddings.mean(0)).to(self.device)
        return self._base_mean

    @torch.no_grad()
    def evaluate(self, episodes: EpisodeIndices, krecip: Sequence[KReciprocal] = (), with_ssr: bool = True,
                 peers: Sequence[str] = ()) -> EpisodeScores:
        """Accuracies and costs on a batch; peers: names in ``ssr_model.baselines.PEER_METHODS``."""
        support, query, labels = gather(self.split, episodes, self.device)
        E = len(episodes)

        def acc(scores: torch.Tensor) -> np.ndarray:
            return (scores.argmax(-1) == labels).float().mean(-1).cpu().numpy()

        with measure_cost(self.device, E) as m:
            scores = baseline_scores(support, query)
        out = EpisodeScores(acc(scores), cost={"baseline": m.cost})
        for params in krecip:
            with measure_cost(self.device, E) as m:
                out.krecip[params] = krecip_accuracy(support, query, labels, params)
            out.cost[krecip_key(params)] = m.cost
        if with_ssr and self.model is not None:
            with measure_cost(self.device, E) as m:
                per_step = self.model(support, query, return_all_steps=True)
            out.ssr_by_step = [acc(scores) for scores in per_step]
            out.cost["ssr"] = m.cost
        for name in peers:
            method = peer_method(name)
            method.check(support.shape[1], support.shape[2], query.shape[1])
            base_mean = self.base_mean() if method.centres_on_base else None
            with measure_cost(self.device, E) as m:
                scores = method.score(support, query, base_mean)
            out.peers[name] = acc(scores)
            out.cost[name] = m.cost
        return out
