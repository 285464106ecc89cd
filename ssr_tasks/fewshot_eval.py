"""Few-shot evaluation of baseline, k-reciprocal and SSR on episodes (plain code).

``FewShotEvaluator`` is what a Ray actor wraps: it loads the split's features and the
model once, then scores chunks of episodes. Accuracies come back per episode (fractions),
so the driver computes mean and 95% interval over all episodes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model import FewShotSSR
from ssr_model.baselines import fewshot_k_reciprocal
from ssr_tasks.episodes import EpisodeIndices, gather, load_split

KRecip = tuple[int, int, float]


def baseline_scores(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine to prototypes. support (E, n_way, n_shot, D), query (E, n_query, D) -> (E, n_query, n_way)."""
    protos = F.normalize(support.mean(2), dim=-1, eps=1e-12)
    return F.normalize(query, dim=-1, eps=1e-12) @ protos.transpose(1, 2)


def krecip_accuracy(support: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, params: KRecip) -> np.ndarray:
    """Per-episode accuracy of k-reciprocal re-ranking (queries vs prototypes)."""
    k1, k2, lam = params
    protos = support.mean(2).cpu().numpy()
    q = query.cpu().numpy()
    lab = labels.cpu().numpy()
    accs = np.empty(len(q))
    for e in range(len(q)):
        dist = np.asarray(fewshot_k_reciprocal(protos[e], q[e], k1=k1, k2=k2, lambda_value=lam))
        accs[e] = float((dist.argmin(1) == lab[e]).mean())
    return accs


class FewShotEvaluator:
    """Scores episodes of one split with a trained FewShotSSR (loaded once)."""

    def __init__(self, features_path: str, split: str, model_path: str | None, model_kwargs: dict | None, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        expected_dim = int(model_kwargs["feat_dim"]) if model_kwargs else None
        self.split = load_split(Path(features_path), split, expected_dim=expected_dim)
        self.model = None
        if model_path is not None:
            from ssr_tasks.faults import load_weights

            self.model = FewShotSSR(**model_kwargs)
            load_weights(self.model, model_path, f"FewShotSSR({', '.join(f'{k}={v}' for k, v in model_kwargs.items())})")
            self.model.to(self.device).eval()

    @torch.no_grad()
    def evaluate(self, episodes: EpisodeIndices, krecip: list[KRecip] | None = None, with_ssr: bool = True) -> dict[str, np.ndarray]:
        """{"baseline": (E,), "k-reciprocal k1=..": (E,), "ssr@<step>": (E,) for steps 0..S}."""
        support, query, labels = gather(self.split, episodes, self.device)
        out = {"baseline": (baseline_scores(support, query).argmax(-1) == labels).float().mean(-1).cpu().numpy()}
        for params in krecip or []:
            out[f"krecip:{params[0]}:{params[1]}:{params[2]}"] = krecip_accuracy(support, query, labels, params)
        if with_ssr and self.model is not None:
            per_step = self.model(support, query, return_all_steps=True)
            for s, scores in enumerate(per_step):
                out[f"ssr_step{s}"] = (scores.argmax(-1) == labels).float().mean(-1).cpu().numpy()
        return out


def merge(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
