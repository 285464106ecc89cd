"""Few-shot evaluation of baseline, k-reciprocal, SSR and the peer methods on episodes (plain code).

``FewShotEvaluator`` is what a Ray actor wraps: it loads the split's features and the
model once, then scores chunks of episodes. Accuracies come back per episode (fractions),
so the driver computes mean and 95% interval over all episodes. Each method's call on a
chunk is timed and its peak memory measured there, in the actor (``MethodCost``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model.baselines import fewshot_k_reciprocal, peer_method
from ssr_model.baselines.peers import COMPOSED_METHODS, composed_method
from ssr_tasks.costs import MethodCost, measure_cost, peak_bytes_of_call
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


def krecip_key(params: KReciprocal) -> str:
    """The cost key of a k-reciprocal setting in ``EpisodeScores.cost``."""
    return f"krecip {params.label}"


@dataclass
class EpisodeScores:
    """Per-episode accuracies (E,) of each method on a batch of episodes.

    krecip: one array per k-reciprocal setting; ssr_by_step: SSR after 0..steps refinements
    (empty without a model or with ``with_ssr=False``); ssr_variants: the same for each other
    SSR model by its name (``variant_key``); peers: by peer method name
    (``ssr_model.baselines.PEER_METHODS``) and composition name (``COMPOSED_METHODS``,
    ``ssr+tim``); cost: by "baseline", ``krecip_key(params)``, "ssr" (one call computes every
    step), ``variant_key(name)`` and peer / composition name.
    """

    baseline: np.ndarray
    krecip: dict[KReciprocal, np.ndarray] = field(default_factory=dict)
    ssr_by_step: list[np.ndarray] = field(default_factory=list)
    peers: dict[str, np.ndarray] = field(default_factory=dict)
    cost: dict[str, MethodCost] = field(default_factory=dict)
    ssr_variants: dict[str, list[np.ndarray]] = field(default_factory=dict)

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
            {
                v: [np.concatenate([c.ssr_variants[v][s] for c in chunks]) for s in range(len(steps))]
                for v, steps in first.ssr_variants.items()
            },
        )


def variant_key(name: str) -> str:
    """The cost key of the SSR model ``name`` of ``FewShotEvaluator``'s variants in ``EpisodeScores.cost``."""
    return f"ssr:{name}"


class FewShotEvaluator:
    """Scores episodes of one split with a trained FewShotSSR (loaded once), or without a model.

    variants: other trained SSR models by name (e.g. trained on Dirichlet query sets), scored
    on the same episodes beside ``model``."""

    def __init__(
        self,
        features_path: str,
        split: str,
        model: FewShotModel | None,
        device: str = "cpu",
        threads: int | None = None,
        variants: Sequence[tuple[str, FewShotModel]] = (),
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.features_path = Path(features_path)
        self.split = load_split(self.features_path, split, expected_dim=model.feat_dim if model else None)
        self.model = model.build().to(self.device) if model is not None else None
        self.variants = {name: m.build().to(self.device) for name, m in variants}
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
        compose_with: str = "",
    ) -> EpisodeScores:
        """Accuracies and costs on a batch; peers: names in ``ssr_model.baselines.PEER_METHODS``
        and compositions (``COMPOSED_METHODS``: the peer on the refined features of the SSR
        model ``compose_with``, a variant's name, "" for ``model``; skipped without a model or
        with ``with_ssr=False``). A composition's cost is its whole call: SSR's refinement and
        the peer."""
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
        for name, variant in self.variants.items() if with_ssr else ():
            per_step, out.cost[variant_key(name)] = self._cost(
                variant_key(name), E, partial(variant, support, query, return_all_steps=True)
            )
            out.ssr_variants[name] = [acc(scores) for scores in per_step]
        for name in peers:
            if name in COMPOSED_METHODS:
                refiner = self.variants[compose_with] if compose_with else self.model
                if refiner is None or not with_ssr:
                    continue
                composed = composed_method(name)
                composed.check(support.shape[1], support.shape[2], query.shape[1])
                scores, out.cost[name] = self._cost(
                    name, E, partial(composed.score, refiner.refine_episode, support, query, None)
                )
                out.peers[name] = acc(scores)
                continue
            method = peer_method(name)
            method.check(support.shape[1], support.shape[2], query.shape[1])
            base_mean = self.base_mean() if method.centres_on_base else None
            scores, out.cost[name] = self._cost(name, E, partial(method.score, support, query, base_mean))
            out.peers[name] = acc(scores)
        return out
