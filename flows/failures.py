"""How `ssr run` reports a failed run: one line naming the step and the cause on the
terminal; the full tracebacks stay in the Prefect logs of the flow and task runs."""

from __future__ import annotations

import logging
import sys
import types

from prefect import Task
from prefect.logging.handlers import PrefectConsoleHandler


class _NoRunTracebacks(logging.Filter):
    """Console only: the errors of flow and task runs carry their traceback to the Prefect
    API handler, not to the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def quiet_console_tracebacks() -> None:
    """Install the filter on Prefect's console handler (set up when Prefect is imported)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoRunTracebacks) for f in handler.filters
        ):
            handler.addFilter(_NoRunTracebacks())


def _task_names() -> dict[types.CodeType, str]:
    """Code object of every loaded pipeline task's function -> the task's name."""
    names = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("ssr_tasks", "flows")):
            continue
        for value in vars(module).values():
            if isinstance(value, Task):
                names[value.fn.__code__] = value.name
    return names


def failed_step(exc: BaseException) -> str:
    """The innermost pipeline task in the exception's traceback ("the flow" when none)."""
    names, step = _task_names(), "the flow"
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        tb = cur.__traceback__
        while tb is not None:
            step = names.get(tb.tb_frame.f_code, step)
            tb = tb.tb_next
        cur = cur.__cause__ or cur.__context__
    return step


def one_line(exc: BaseException) -> str:
    """``step <name>: <ExceptionType>: <first line of the message>``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"step {failed_step(exc)} failed: {type(exc).__name__}" + (f": {first}" if first else "")
