"""Failures are quiet and fast: deterministic errors are not retried, transient ones are,
and `ssr run` reports one line naming the step (real Prefect test harness)."""

from __future__ import annotations

import errno
import logging
import time

import pytest
from prefect import flow, task

from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot.handoffs import FewShotData
from ssr_tasks.handoffs import Features
from ssr_tasks.taskkit import is_transient, retry_transient

ATTEMPTS: list[str] = []


@task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_transient)
def flaky(error: str) -> str:
    ATTEMPTS.append(error)
    if len(ATTEMPTS) == 1 or error == "value":
        raise {"io": OSError(errno.EIO, "input/output error"), "value": ValueError("bad layout")}[error]
    return "ok"


@flow
def run_flaky(error: str) -> str:
    return flaky(error)


def test_only_transient_errors_are_retried(prefect_harness):
    ATTEMPTS.clear()
    assert run_flaky("io") == "ok" and ATTEMPTS == ["io", "io"]
    ATTEMPTS.clear()
    with pytest.raises(ValueError, match="bad layout"):
        run_flaky("value")
    assert ATTEMPTS == ["value"]  # a deterministic error fails at once


def test_transient_classification():
    assert (
        is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError(errno.EIO, "x"))
    )
    assert (
        not is_transient(FileNotFoundError("x"))
        and not is_transient(ValueError("x"))
        and not is_transient(KeyError("x"))
    )


def test_failure_is_one_line_naming_the_step(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run

    from flows.failures import one_line, quiet_console_tracebacks
    from ssr_tasks.fewshot import tasks

    monkeypatch.setenv("SSR_HOME", str(tmp_path))
    run_ids = []

    @flow
    def broken():
        run_ids.append(flow_run.id)
        p = FewShotParams()
        return tasks.validation_episodes(
            p.evaluation.n_val_episodes,
            p.train.episode,
            p.train.seed,
            Features(str(tmp_path / "missing.parquet"), 8),
            FewShotData(str(tmp_path), None),
            str(tmp_path),
        )

    quiet_console_tracebacks()
    try:
        with pytest.raises(Exception) as info:
            broken()
        line = one_line(info.value)
        assert line.startswith("step validation-episodes failed: ") and "missing.parquet" in line and "\n" not in line
        # (what reaches the terminal is checked on a real `ssr run` process in the next test)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()
        deadline, logs = time.monotonic() + 30, []
        with get_client(sync_client=True) as client:  # ... the Prefect logs of the run have it
            while time.monotonic() < deadline and not any("Traceback" in log.message for log in logs):
                time.sleep(0.5)
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
        assert any("Traceback" in log.message and "missing.parquet" in log.message for log in logs), [
            log.message[:200] for log in logs
        ]
    finally:
        for handler in logging.getLogger().handlers:
            handler.filters = [f for f in handler.filters if type(f).__name__ != "_NoRunTracebacks"]


def test_ssr_run_failure_is_one_line_on_the_terminal_and_a_traceback_in_prefect(prefect_harness, tmp_path):
    """`ssr run` as a user runs it (its own process) against a Prefect API: a step failing
    inside the run prints one line naming the step and the cause, no traceback; the
    traceback is in the Prefect logs of the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    helper = Path(__file__).with_name("ssr_with_failing_step.py")
    env = {**os.environ, "SSR_HOME": str(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs()}
    out = subprocess.run(
        [sys.executable, str(helper), "run", "fewshot", "--preset", "reproduce-fewshot-tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "ssr run: step prepare-data failed: ValueError: glyphs/fewshot/val: expected at least 5 class "
        "folders, found 0 (traceback in the Prefect logs of the flow run)"
    ), out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        runs = [r.id for r in client.read_flow_runs() if r.id not in before]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)))
    assert runs and any("Traceback" in log.message and "broken_data" in log.message for log in logs), [
        log.message[:200] for log in logs
    ]
