"""Ray side of the retrieval track: the Tune trainable of retrieval SSR training.

The re-ranking actor pool is in ``ssr_tasks.retrieval.rerank`` next to its plain worker.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.ray_grid import TrialWorkspace, run_grid
from ssr_tasks.retrieval.handoffs import RetrievalTrial
from ssr_tasks.retrieval.train import RetrievalTrainConfig, load_training_data, train_retrieval


def retrieval_trial(config: dict) -> None:
    """Ray Tune function trainable: retrieval SSR training for one lr_dni (config: see ``run_grid``).

    It trains in a ``TrialWorkspace``: every validation is reported with the loop's files
    as a Tune checkpoint, and a restarted or restored trial resumes from the latest one."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = RetrievalTrainConfig(**{**config["train"], "lr_dni": float(config["lr_dni"])})
    emb, labels, val = load_training_data(Path(config["features"]), cfg)
    with TrialWorkspace() as ws:
        summary = train_retrieval(cfg, emb, labels, val, ws.path, device=config["device"],
                                  report=lambda row: ws.report({**row, "progress": row["iteration"] / cfg.iterations}))
        summary = {**summary, "n_train_images": len(emb), "n_val_queries": len(val.queries)}
        ws.finish(summary, {"best_val_map": summary["best_val"], "done": 1, "progress": 1.0})


def run_trials(base: RetrievalTrainConfig, lr_grid: Sequence[float], features: Path, ckpt_root: Path, storage_path: Path,
               device: str = "cpu", max_failures: int = 2,
               progress: Callable[[float], None] | None = None,
               tracking: TrialTracking | None = None) -> list[RetrievalTrial]:
    """One trial per lr_dni in parallel (``ssr_tasks.ray_grid.run_grid``) on the training table
    ``features`` (splits 'train' and 'val'); their results, in grid order."""
    done = run_grid(retrieval_trial, "retrieval-ssr", base, list(lr_grid), {"features": str(features)},
                    ckpt_root, storage_path, device, max_failures, progress, tracking)
    return [RetrievalTrial.from_summary(replace(base, lr_dni=lr), summary) for lr, summary in done]
