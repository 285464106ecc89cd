"""Ray side of the retrieval track: the Tune trainable of retrieval SSR training.

The re-ranking actor pool is in ``ssr_tasks.retrieval.rerank`` next to its plain worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.ray_grid import Trial, run_grid
from ssr_tasks.retrieval.handoffs import RetrievalTrial
from ssr_tasks.retrieval.train import load_training_data, train_retrieval


@dataclass(frozen=True)
class RetrievalTrialInputs:
    """What a retrieval trial reads: the training table (splits 'train' and 'val')."""

    features: str


def retrieval_trial(trial: Trial[RetrievalTrainParams]) -> tuple[dict, dict]:
    """The trainable of the retrieval grid: SSR trained on retrieval sequences for one sweep point.

    It trains in the trial's workspace: every validation is reported with the loop's files
    as a Tune checkpoint, and a restarted or restored trial resumes from the latest one."""
    cfg = trial.config
    emb, labels, val = load_training_data(Path(trial.inputs.features), cfg)
    summary = train_retrieval(
        cfg,
        emb,
        labels,
        val,
        trial.workspace.path,
        device=trial.device,
        report=lambda row: trial.workspace.report({**row, "progress": row["iteration"] / cfg.iterations}),
    )
    summary = {**summary, "n_train_images": len(emb), "n_val_queries": len(val.queries)}
    return summary, {"best_val_map": summary["best_val"]}


def run_trials(
    base: RetrievalTrainParams,
    sweep: Mapping[str, Sequence],
    features: Path,
    feat_dim: int,
    ckpt_root: Path,
    storage_path: Path,
    device: str = "cpu",
    max_failures: int = 2,
    progress: Callable[[float], None] | None = None,
    tracking: TrialTracking | None = None,
) -> list[RetrievalTrial]:
    """One trial per point of ``sweep`` in parallel (``ssr_tasks.ray_grid.run_grid``) on the
    training table ``features`` (splits 'train' and 'val'); their results, in the sweep's order."""
    done = run_grid(
        retrieval_trial,
        base,
        sweep,
        name="retrieval-ssr",
        inputs=RetrievalTrialInputs(str(features)),
        ckpt_root=ckpt_root,
        storage_path=storage_path,
        device=device,
        max_failures=max_failures,
        progress=progress,
        tracking=tracking,
    )
    return [RetrievalTrial.from_summary(r.config, r.label, feat_dim, r.summary) for r in done]
