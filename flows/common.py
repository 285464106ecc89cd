"""Small pieces shared by the subflows."""

from __future__ import annotations

from prefect import runtime


def prefect_tags() -> dict[str, str]:
    """MLflow tags tying a run to Prefect: this subflow's run and the run the user started."""
    return {
        "prefect_flow_run_id": str(runtime.flow_run.id or ""),
        "prefect_root_flow_run_id": str(runtime.flow_run.root_flow_run_id or runtime.flow_run.id or ""),
        "prefect_flow_run_name": str(runtime.flow_run.name or ""),
    }
