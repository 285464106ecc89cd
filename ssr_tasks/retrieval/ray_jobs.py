"""Ray side of the retrieval track: the Tune trainable of retrieval SSR training.

The re-ranking actor pool is in ``ssr_tasks.retrieval.rerank`` next to its plain worker.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.ray_grid import SUMMARY, run_grid, trial_dir
from ssr_tasks.retrieval.handoffs import RetrievalTrial
from ssr_tasks.retrieval.train import RetrievalTrainConfig, load_training_data, train_retrieval
from storage.atomic import atomic_write_text


def retrieval_trial(config: dict) -> None:
    """Ray Tune function trainable: retrieval SSR training for one lr_dni (config: see ``run_grid``)."""
    from ray import tune  # Ray is heavy and only needed where a grid runs

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = RetrievalTrainConfig(**{**config["train"], "lr_dni": float(config["lr_dni"])})
    emb, labels, val = load_training_data(Path(config["features"]), cfg)
    out = trial_dir(Path(config["ckpt_root"]), cfg.lr_dni)
    summary = train_retrieval(cfg, emb, labels, val, out, device=config["device"],
                              report=lambda row: tune.report({**row, "progress": row["iteration"] / cfg.iterations}))
    summary["n_train_images"], summary["n_val_queries"] = len(emb), len(val.queries)
    atomic_write_text(out / SUMMARY, json.dumps(summary))
    tune.report({"best_val_map": summary["best_val"], "done": 1, "progress": 1.0})


def run_trials(base: RetrievalTrainConfig, lr_grid: Sequence[float], features: Path, ckpt_root: Path, storage_path: Path,
               device: str = "cpu", max_failures: int = 2,
               progress: Callable[[float], None] | None = None,
               tracking: TrialTracking | None = None) -> list[RetrievalTrial]:
    """One trial per lr_dni in parallel (``ssr_tasks.ray_grid.run_grid``) on the training table
    ``features`` (splits 'train' and 'val'); their results, in grid order."""
    done = run_grid(retrieval_trial, "retrieval-ssr", base, list(lr_grid), {"features": str(features)},
                    ckpt_root, storage_path, device, max_failures, progress, tracking)
    return [RetrievalTrial.from_summary(replace(base, lr_dni=lr), summary) for lr, summary in done]
