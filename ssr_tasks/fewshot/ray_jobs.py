"""Ray side of the few-shot track: the Tune trainable of SSR training and the evaluation actor pool."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssr_tasks.backbone import load_backbone
from ssr_tasks.config import FewShotTrainParams
from ssr_tasks.fewshot.episodes import EpisodeIndices, load_split
from ssr_tasks.fewshot.evaluate import EPISODES_PER_CALL, EpisodeScores, FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotModel, FewShotTrial, KReciprocal, TrainingFeatures
from ssr_tasks.fewshot.train import train_curriculum
from ssr_tasks.fewshot.train_features import TrainAugment, training_source
from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.ray_grid import Trial, run_grid
from ssr_tasks.services import pool_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotTrialInputs:
    """What a few-shot trial reads: the features table, the validation episodes (.npz), and
    where training episodes take their features (None: the table)."""

    features: str
    val_episodes: str
    training: TrainingFeatures | None = None
    # a trial trained at n_shot with a query balance validates on episodes of that shot count and balance
    val_by_shot: tuple[tuple[int, str, str], ...] = ()  # (n_shot, query balance, .npz)

    def val_for(self, n_shot: int, query_balance: str = "balanced") -> str:
        return {(shot, b): path for shot, b, path in self.val_by_shot}.get((n_shot, query_balance), self.val_episodes)


def fewshot_trial(trial: Trial[FewShotTrainParams]) -> tuple[dict, dict]:
    """The trainable of the few-shot grid: the steps curriculum for one sweep point.

    It trains in the trial's workspace: every validation is reported with the stages' files
    as a Tune checkpoint, and a restarted or restored trial resumes from the latest one."""
    cfg, inputs = trial.config, trial.inputs
    train = load_split(Path(inputs.features), "train")
    training = inputs.training
    augment = TrainAugment.parse(training.mode if training else "none")
    net = None
    if augment.mode == "online":
        net = load_backbone(training.backbone.name, training.backbone.spec, Path(training.backbone.path), trial.device)
    source = training_source(
        augment,
        train,
        cfg.seed,
        views_path=training.views_path if training else None,
        net=net,
        data_root=training.data_root if training else None,
        dataset=training.backbone.spec if training else None,
        device=trial.device,
    )
    val = load_split(Path(inputs.features), "val")
    val_eps = EpisodeIndices.load(Path(inputs.val_for(cfg.n_shot, cfg.trained_balance)))

    def report(row: dict) -> None:
        done = row["iteration"] + (
            0 if row["steps"] == 1 else cfg.iterations_first + (row["steps"] - 2) * cfg.iterations_next
        )
        trial.workspace.report({**row, "progress": done / cfg.total_iterations})

    summary = train_curriculum(cfg, source, val, val_eps, trial.workspace.path, device=trial.device, report=report)
    return summary, {"best_val_acc": summary["best_val"], "best_steps": summary["best_steps"]}


def run_trials(
    base: FewShotTrainParams,
    sweep: Mapping[str, Sequence],
    inputs: FewShotTrialInputs,
    feat_dim: int,
    ckpt_root: Path,
    storage_path: Path,
    device: str = "cpu",
    max_failures: int = 2,
    progress: Callable[[float], None] | None = None,
    tracking: TrialTracking | None = None,
) -> list[FewShotTrial]:
    """One trial per point of ``sweep`` in parallel (``ssr_tasks.ray_grid.run_grid``); their
    results, in the sweep's order."""
    done = run_grid(
        fewshot_trial,
        base,
        sweep,
        name="fewshot-ssr",
        inputs=inputs,
        ckpt_root=ckpt_root,
        storage_path=storage_path,
        device=device,
        max_failures=max_failures,
        progress=progress,
        tracking=tracking,
    )
    return [FewShotTrial.from_summary(r.config, r.label, feat_dim, r.summary) for r in done]


def evaluate_with_pool(
    features: Path,
    split: str,
    episodes: EpisodeIndices,
    model: FewShotModel | None,
    krecip: Sequence[KReciprocal] = (),
    with_ssr: bool = True,
    n_actors: int = 0,
    device: str = "cpu",
    chunk: int = EPISODES_PER_CALL,
    progress: Callable[[int, int], None] | None = None,
    peers: Sequence[str] = (),
    variants: Sequence[tuple[str, FewShotModel]] = (),
    compose_with: str = "",
) -> EpisodeScores:
    """Score episodes with a pool of Ray actors (model and features loaded once per actor, one GPU each on "cuda").

    peers: peer methods (``ssr_model.baselines.PEER_METHODS`` names) and compositions
    (``ssr+tim``, ``ssr+pt-map``: on the refined features of ``model``, or of the variant
    named ``compose_with``) scored on the same episodes; variants: other SSR models by name,
    scored beside ``model`` (``FewShotEvaluator``); every method's time and peak memory are
    measured in the actors. chunk: episodes per actor call (``EPISODES_PER_CALL``, the E of
    the peak-memory column)."""
    import ray  # lazy: Ray is heavy and only needed where a pool runs
    from ray.util import ActorPool  # lazy: Ray, as above

    use_gpu = device == "cuda"
    n = min(pool_size(n_actors, use_gpu), max(1, -(-len(episodes) // chunk)))
    Actor = ray.remote(FewShotEvaluator).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=2, max_task_retries=2
    )
    actors = [Actor.remote(str(features), split, model, device, 1, list(variants)) for _ in range(n)]
    pool = ActorPool(actors)
    chunks = [episodes.chunk(s, s + chunk) for s in range(0, len(episodes), chunk)]
    results = []
    calls = pool.map(lambda a, c: a.evaluate.remote(c, list(krecip), with_ssr, list(peers), compose_with), chunks)
    for i, res in enumerate(calls):
        results.append(res)
        if progress is not None:
            progress(i + 1, len(chunks))
    for a in actors:
        ray.kill(a)  # type: ignore[arg-type]  # Ray stub: ray.remote(cls).options(...).remote() is an ActorHandle
    return EpisodeScores.merge(results)
