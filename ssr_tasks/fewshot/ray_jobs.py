"""Ray side of the few-shot track: the Tune trainable of SSR training and the evaluation actor pool."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ssr_tasks.fewshot.episodes import EpisodeIndices, load_split
from ssr_tasks.fewshot.evaluate import EpisodeScores, FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotModel, FewShotTrial, KReciprocal
from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.backbone import load_backbone
from ssr_tasks.fewshot.train import TrainConfig, train_curriculum
from ssr_tasks.fewshot.train_features import TrainAugment, training_source
from ssr_tasks.ray_grid import TrialWorkspace, run_grid
from ssr_tasks.services import pool_size

log = logging.getLogger(__name__)


def fewshot_trial(config: dict) -> None:
    """Ray Tune function trainable: the steps curriculum for one lr_dni (config: see ``run_grid``).

    It trains in a ``TrialWorkspace``: every validation is reported with the stages' files
    as a Tune checkpoint, and a restarted or restored trial resumes from the latest one."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = TrainConfig(**{**config["train"], "lr_dni": float(config["lr_dni"])})
    train = load_split(Path(config["features"]), "train")
    augment = TrainAugment.parse(config.get("augment", "none"))
    net = None
    if augment.mode == "online":
        net = load_backbone(config["backbone"], config["spec"], Path(config["backbone_path"]), config["device"])
    source = training_source(augment, train, cfg.seed, views_path=config.get("views") or None, net=net,
                             data_root=config.get("data_root"), dataset=config.get("spec"), device=config["device"])
    val = load_split(Path(config["features"]), "val")
    val_eps = EpisodeIndices.load(Path(config["val_episodes"]))
    total = cfg.iterations_first + (cfg.max_steps - 1) * cfg.iterations_next

    with TrialWorkspace() as ws:
        if ws.resumed:
            log.info("trial lr_dni=%g: resuming from its last Tune checkpoint", cfg.lr_dni)

        def report(row: dict) -> None:
            done = row["iteration"] + (0 if row["steps"] == 1 else cfg.iterations_first + (row["steps"] - 2) * cfg.iterations_next)
            ws.report({**row, "progress": done / total})

        summary = train_curriculum(cfg, source, val, val_eps, ws.path, device=config["device"], report=report)
        ws.finish(summary, {"best_val_acc": summary["best_val"], "best_steps": summary["best_steps"], "done": 1,
                            "progress": 1.0})


def run_trials(base: TrainConfig, lr_grid: Sequence[float], features: Path, val_episodes: Path, ckpt_root: Path,
               storage_path: Path, device: str = "cpu", max_failures: int = 2,
               progress: Callable[[float], None] | None = None,
               training: Mapping[str, str] | None = None, tracking: TrialTracking | None = None) -> list[FewShotTrial]:
    """One trial per lr_dni in parallel (``ssr_tasks.ray_grid.run_grid``); their results, in grid order.

    training: where episode features come from (``TrainingFeatures.as_inputs()``; default:
    the features table)."""
    inputs = {"features": str(features), "val_episodes": str(val_episodes), **(training or {})}
    done = run_grid(fewshot_trial, "fewshot-ssr", base, list(lr_grid), inputs, ckpt_root, storage_path, device,
                    max_failures, progress, tracking)
    return [FewShotTrial.from_summary(replace(base, lr_dni=lr), summary) for lr, summary in done]


def evaluate_with_pool(
    features: Path,
    split: str,
    episodes: EpisodeIndices,
    model: FewShotModel | None,
    krecip: Sequence[KReciprocal] = (),
    with_ssr: bool = True,
    n_actors: int = 0,
    device: str = "cpu",
    chunk: int = 50,
    progress: Callable[[int, int], None] | None = None,
    peers: Sequence[str] = (),
) -> EpisodeScores:
    """Score episodes with a pool of Ray actors (model and features loaded once per actor, one GPU each on "cuda").

    peers: peer methods (``ssr_model.baselines.PEER_METHODS`` names) scored on the same episodes;
    every method's time and peak memory are measured in the actors."""
    import ray  # Ray is heavy and only needed where a pool runs
    from ray.util import ActorPool

    use_gpu = device == "cuda"
    n = min(pool_size(n_actors, use_gpu), max(1, -(-len(episodes) // chunk)))
    Actor = ray.remote(FewShotEvaluator).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=2, max_task_retries=2)
    actors = [Actor.remote(str(features), split, model, device, 1) for _ in range(n)]
    pool = ActorPool(actors)
    chunks = [episodes.chunk(s, s + chunk) for s in range(0, len(episodes), chunk)]
    results = []
    for i, res in enumerate(pool.map(lambda a, c: a.evaluate.remote(c, list(krecip), with_ssr, list(peers)), chunks)):
        results.append(res)
        if progress is not None:
            progress(i + 1, len(chunks))
    for a in actors:
        ray.kill(a)
    return EpisodeScores.merge(results)
