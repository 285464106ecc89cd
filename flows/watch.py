"""`ssr watch <flow-run-id>`: what a flow run is doing, one line every few seconds.

``prefect deployment run --watch`` shows only state changes; this shows the running step,
the latest progress (the steps' progress artifacts) and the latest log line of the run and
its subflows, until the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort, LogSort


def status_line(client, root: UUID, started: float) -> tuple[str, bool, str]:
    """(line, final?, state name) of the flow run ``root`` and its subflows."""
    run = client.read_flow_run(root)
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root]))
    )
    ids = [root] + [c.id for c in children]
    running = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))),
    )
    progress = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=ids), type=ArtifactFilterType(any_=["progress"])
        ),
        sort=ArtifactSort.UPDATED_DESC,
        limit=1,
    )
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=1, sort=LogSort.TIMESTAMP_DESC)
    state = run.state.name if run.state else "?"
    elapsed = int(time.time() - started)
    parts = [f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {state}"]
    if running:
        parts.append("step " + ", ".join(sorted(t.name for t in running)))
    if progress:
        parts.append(f"{progress[0].description or progress[0].key}: {float(progress[0].data or 0):.0f}%")
    if logs:
        parts.append(logs[0].message.strip().splitlines()[0][:160])
    return " | ".join(parts), bool(run.state and run.state.is_final()), state


def watch(flow_run_id: str, interval: float = 5.0, timeout: float = 5400.0, out: Callable[[str], None] = print) -> str:
    """Print a status line every ``interval`` seconds until the run ends; returns its final state name."""
    root, started = UUID(str(flow_run_id)), time.time()
    with get_client(sync_client=True) as client:
        while True:
            line, final, state = status_line(client, root, started)
            out(line)
            if final:
                return state
            if time.time() - started > timeout:
                raise TimeoutError(f"flow run {flow_run_id}: still {state} after {timeout:.0f} s")
            time.sleep(interval)
