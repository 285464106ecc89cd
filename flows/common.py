"""Small pieces shared by the subflows."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from prefect import runtime

from ssr_tasks.config import default_run_dir
from ssr_tasks.tracking import Tracker


def prefect_tags() -> dict[str, str]:
    """MLflow tags tying a run to Prefect: this subflow's run and the run the user started."""
    return {
        "prefect_flow_run_id": str(runtime.flow_run.id or ""),
        "prefect_root_flow_run_id": str(runtime.flow_run.root_flow_run_id or runtime.flow_run.id or ""),
        "prefect_flow_run_name": str(runtime.flow_run.name or ""),
    }


@contextlib.contextmanager
def pipeline_run(kind: str, params) -> Iterator[tuple[Tracker, str, Path, Path]]:
    """Open a subflow: its run folder and work folder, and the parent MLflow run that spans
    the whole flow run (its duration is the pipeline's), with the parameters logged.

    kind: "fewshot" or "retrieval". Yields (tracker, MLflow run id, run dir, work dir).
    The Tracker fails fast when a remote MLflow is unreachable.
    """
    run_dir = default_run_dir()
    work = run_dir / kind / f"{params.dataset}-{params.backbone}-seed{params.seed}"
    work.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"ssr-{kind}", run_dir)
    with tracker.run(f"{kind}-{params.dataset}-{params.backbone}", tags=prefect_tags()) as parent:
        tracker.log_params(params.model_dump())
        tracker.log_dict(params.model_dump(), "config.json")
        yield tracker, parent.info.run_id, run_dir, work
