"""Failures are quiet and fast: deterministic errors are not retried, transient ones are,
and `ssr run` reports one line naming the step (real Prefect test harness)."""
from __future__ import annotations

import errno
import logging

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
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError(errno.EIO, "x"))
    assert not is_transient(FileNotFoundError("x")) and not is_transient(ValueError("x")) and not is_transient(KeyError("x"))


def test_failure_is_one_line_naming_the_step(prefect_harness, tmp_path, monkeypatch, capsys):
    from flows.failures import one_line, quiet_console_tracebacks
    from ssr_tasks.fewshot import tasks

    monkeypatch.setenv("SSR_HOME", str(tmp_path))

    @flow
    def broken():
        return tasks.validation_episodes(FewShotParams(), Features(str(tmp_path / "missing.parquet"), 8),
                                         FewShotData(str(tmp_path), None), str(tmp_path))

    quiet_console_tracebacks()
    try:
        with pytest.raises(Exception) as info:
            broken()
        line = one_line(info.value)
        assert line.startswith("step validation-episodes failed: ") and "missing.parquet" in line and "\n" not in line
        assert "Traceback" not in capsys.readouterr().err  # the console got no traceback
    finally:
        for handler in logging.getLogger().handlers:
            handler.filters = [f for f in handler.filters if type(f).__name__ != "_NoRunTracebacks"]
