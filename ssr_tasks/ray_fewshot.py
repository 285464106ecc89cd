"""Ray side of the few-shot pipeline: a Tune grid of SSR trainings and an evaluation actor pool."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ssr_tasks.episodes import EpisodeIndices
from ssr_tasks.fewshot_eval import FewShotEvaluator, merge
from ssr_tasks.fewshot_train import TrainConfig

log = logging.getLogger(__name__)


def trial_dir(ckpt_root: Path, lr_dni: float) -> Path:
    """A trial's checkpoints live under a name fixed by its parameters, so reruns find them."""
    return Path(ckpt_root) / f"lr_dni={lr_dni:g}"


def fewshot_trial(config: dict) -> None:
    """Ray Tune function trainable: the steps curriculum for one lr_dni."""
    import torch
    from ray import tune

    from ssr_tasks.episodes import load_split
    from ssr_tasks.fewshot_train import train_curriculum

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = TrainConfig(**{**config["train"], "lr_dni": float(config["lr_dni"])})
    train = load_split(Path(config["features"]), "train")
    val = load_split(Path(config["features"]), "val")
    eps = np.load(config["val_episodes"])
    val_eps = EpisodeIndices(eps["support"], eps["query"])
    device = "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"
    out = trial_dir(Path(config["ckpt_root"]), cfg.lr_dni)
    total = cfg.iterations_first + (cfg.max_steps - 1) * cfg.iterations_next

    def report(row: dict) -> None:
        done = row["iteration"] + (0 if row["steps"] == 1 else cfg.iterations_first + (row["steps"] - 2) * cfg.iterations_next)
        tune.report({**row, "progress": done / total})
        from ssr_tasks.faults import maybe_kill

        maybe_kill(f"fewshot-trial-lr_dni={cfg.lr_dni:g}-after-validation")  # test-only, inert by default

    summary = train_curriculum(cfg, train, val, val_eps, out, device=device, report=report)
    from storage.atomic import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary))
    tune.report({"best_val_acc": summary["best_val"], "best_steps": summary["best_steps"], "done": 1, "progress": 1.0})


def run_grid(
    base: TrainConfig,
    lr_grid: list[float],
    features: Path,
    val_episodes_npz: Path,
    ckpt_root: Path,
    storage_path: Path,
    max_failures: int = 2,
    progress=None,
) -> list[dict]:
    """Train one trial per lr_dni in parallel; returns each trial's summary (read from disk).

    Finished trials (a summary on disk) are not run again; interrupted ones resume from
    their last checkpoint inside the trainable.
    """
    from ssr_tasks.ray_grid import tune_grid

    pending = [lr for lr in lr_grid if not (trial_dir(ckpt_root, lr) / "summary.json").exists()]
    space = {
        "train": {k: v for k, v in asdict(base).items() if k != "lr_dni"},
        "features": str(features),
        "val_episodes": str(val_episodes_npz),
        "ckpt_root": str(ckpt_root),
    }
    tune_grid(fewshot_trial, "lr_dni", pending, space, "fewshot-ssr", storage_path, max_failures, progress)
    return [{"lr_dni": lr, **json.loads((trial_dir(ckpt_root, lr) / "summary.json").read_text())} for lr in lr_grid]


def evaluate_with_pool(
    features: Path,
    split: str,
    episodes: EpisodeIndices,
    model_path: str | None,
    model_kwargs: dict | None,
    krecip: list | None = None,
    with_ssr: bool = True,
    n_actors: int = 0,
    chunk: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Score episodes with a pool of Ray actors (model and features loaded once per actor)."""
    import ray
    from ray.util import ActorPool

    from ssr_tasks.services import cluster_has_gpu, pool_size

    use_gpu = cluster_has_gpu()
    n = min(pool_size(n_actors, use_gpu), max(1, -(-len(episodes) // chunk)))
    Actor = ray.remote(FewShotEvaluator).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=2, max_task_retries=2)
    actors = [Actor.remote(str(features), split, model_path, model_kwargs, "cuda" if use_gpu else "cpu", 1) for _ in range(n)]
    pool = ActorPool(actors)
    chunks = [episodes.chunk(s, s + chunk) for s in range(0, len(episodes), chunk)]
    results = []
    for i, res in enumerate(pool.map(lambda a, c: a.evaluate.remote(c, krecip, with_ssr), chunks)):
        results.append(res)
        if progress is not None:
            progress(i + 1, len(chunks))
    for a in actors:
        ray.kill(a)
    return merge(results)
