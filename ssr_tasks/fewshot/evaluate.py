"""Few-shot evaluation of baseline, k-reciprocal and SSR on episodes (plain code).

``FewShotEvaluator`` is what a Ray actor wraps: it loads the split's features and the
model once, then scores chunks of episodes. Accuracies come back per episode (fractions),
so the driver computes mean and 95% interval over all episodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model.baselines import fewshot_k_reciprocal
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


@dataclass
class EpisodeScores:
    """Per-episode accuracies (E,) of each method on a batch of episodes.

    krecip: one array per k-reciprocal setting; ssr_by_step: SSR after 0..steps refinements
    (empty without a model or with ``with_ssr=False``).
    """

    baseline: np.ndarray
    krecip: dict[KReciprocal, np.ndarray] = field(default_factory=dict)
    ssr_by_step: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def merge(chunks: Sequence["EpisodeScores"]) -> "EpisodeScores":
        """Concatenate the episodes of chunks scored separately, in order."""
        first = chunks[0]
        return EpisodeScores(
            np.concatenate([c.baseline for c in chunks]),
            {p: np.concatenate([c.krecip[p] for c in chunks]) for p in first.krecip},
            [np.concatenate([c.ssr_by_step[s] for c in chunks]) for s in range(len(first.ssr_by_step))],
        )


class FewShotEvaluator:
    """Scores episodes of one split with a trained FewShotSSR (loaded once), or without a model."""

    def __init__(self, features_path: str, split: str, model: FewShotModel | None, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.split = load_split(Path(features_path), split, expected_dim=model.feat_dim if model else None)
        self.model = model.build().to(self.device) if model is not None else None

    @torch.no_grad()
    def evaluate(self, episodes: EpisodeIndices, krecip: Sequence[KReciprocal] = (), with_ssr: bool = True) -> EpisodeScores:
        support, query, labels = gather(self.split, episodes, self.device)
        out = EpisodeScores((baseline_scores(support, query).argmax(-1) == labels).float().mean(-1).cpu().numpy())
        for params in krecip:
            out.krecip[params] = krecip_accuracy(support, query, labels, params)
        if with_ssr and self.model is not None:
            per_step = self.model(support, query, return_all_steps=True)
            out.ssr_by_step = [(scores.argmax(-1) == labels).float().mean(-1).cpu().numpy() for scores in per_step]
        return out
