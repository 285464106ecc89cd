"""`ssr watch`: one status line per poll for a flow run and its subflows (real Prefect harness)."""

from __future__ import annotations

from prefect import flow, task

from flows.watch import watch
from ssr_tasks.taskkit import Progress


@task(name="step-with-progress")
def _step() -> int:
    progress = Progress("watch-test-progress", "Watch test")
    progress(1, 2)
    return 1


@flow(name="watch-sub")
def _sub() -> int:
    return _step()


@flow(name="watch-root")
def _root():
    return _sub()


def test_watch_reports_state_progress_and_log(prefect_harness):
    state = _root(return_state=True)
    lines: list[str] = []
    assert watch(str(state.state_details.flow_run_id), interval=0.1, out=lines.append) == "Completed"
    assert len(lines) == 1 and lines[0].startswith("[00:0") and "Completed" in lines[0]
    assert "Watch test: 50%" in lines[0] and lines[0].count(" | ") >= 2  # progress of the subflow's step, a log line
