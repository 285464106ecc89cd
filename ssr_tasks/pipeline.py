"""Opening a pipeline run: its folders and the parent MLflow run that spans it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ssr_tasks.config import FewShotParams, RetrievalParams, default_run_dir
from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.taskkit import short_hash
from ssr_tasks.tracking import Tracker


@dataclass(frozen=True)
class PipelineRun:
    """tracker: the open parent run's tracker; run_id: that MLflow run; run_dir: the run
    folder (data, backbones, MLflow store); work: this pipeline's folder for its dataset,
    backbone and seed; results: where this flow run's tables and plots go."""

    tracker: Tracker
    run_id: str
    run_dir: Path
    work: Path
    results: Path

    @property
    def backbones(self) -> Path:
        return self.run_dir / "backbones"

    def trial_tracking(self, tags: Mapping[str, str]) -> TrialTracking:
        """Where the training trials log live: nested runs of this pipeline's parent run."""
        return TrialTracking(self.tracker.uri, self.tracker.experiment_id, self.run_id, tuple(sorted(tags.items())))


@contextlib.contextmanager
def pipeline_run(
    kind: Literal["fewshot", "retrieval"],
    params: FewShotParams | RetrievalParams,
    tags: Mapping[str, str],
    flow_run_id: str | None,
) -> Iterator[PipelineRun]:
    """Open a subflow: its run folder and work folder, and the parent MLflow run that spans
    the whole flow run (its duration is the pipeline's), with the parameters logged.

    tags: MLflow tags of the parent run (the Prefect run ids); flow_run_id names the results
    folder ("local" without one). The Tracker fails fast when a remote MLflow is unreachable.
    """
    run_dir = default_run_dir()
    # a user's data: the folder also carries the data root, so two tables never share one
    where = (
        f"-{short_hash(str(Path(params.data.data_root).expanduser().resolve()))[:8]}" if params.data.data_root else ""
    )
    work = run_dir / kind / f"{params.data.dataset}{where}-{params.backbone.name}-seed{params.train.seed}"
    work.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"ssr-{kind}", run_dir)
    tracker.close_orphans()  # runs a killed earlier flow process left RUNNING
    with tracker.run(f"{kind}-{params.data.dataset}-{params.backbone.name}", tags=tags) as parent:
        tracker.log_params(params.model_dump())
        tracker.log_dict(params.model_dump(), "config.json")
        yield PipelineRun(tracker, parent.info.run_id, run_dir, work, work / "results" / str(flow_run_id or "local"))
