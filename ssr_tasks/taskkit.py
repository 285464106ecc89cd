"""What every Prefect task of the pipeline shares: the cache policy, short content hashes
for file names, and the progress reporter.

Tasks return file paths inside typed hand-offs (never tensors). A cached task's key is its
source and its inputs: the parameter groups it takes (never the whole parameters) and the
hand-offs of earlier steps; the cache records live in the run folder (``<SSR_HOME>/prefect/cache-keys``), so they go
when the run folder goes, and a cache hit can never hand back paths of a deleted run
folder. The plain functions are idempotent as well (they skip outputs that already exist),
which also covers reruns whose Prefect cache was lost.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from tqdm.auto import tqdm

from ssr_tasks.config import default_run_dir


@dataclass
class RunFolderCache(CachePolicy):
    """Key = task source + inputs (the parameter groups a task takes are among its inputs, so
    the key is exactly what it reads); records under the run folder.

    ``key_storage`` is read when a task runs, so it follows ``SSR_HOME`` of that run.
    """

    @property  # type: ignore[misc]  # a property over CachePolicy's key_storage field: follows SSR_HOME
    def key_storage(self) -> Path:
        return default_run_dir() / "prefect" / "cache-keys"

    @key_storage.setter
    def key_storage(self, value: Any) -> None:  # the dataclass __init__ assigns None; the run folder decides
        pass

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return (INPUTS + TASK_SOURCE).compute_key(task_ctx, inputs, flow_parameters, **kwargs)


CACHE = RunFolderCache()


_DETERMINISTIC_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_RAY_TRANSIENT = (
    "RayActorError",
    "ActorUnavailableError",
    "WorkerCrashedError",
    "NodeDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "GetTimeoutError",
)


def is_transient(exc: BaseException) -> bool:
    """Errors that a second try may not meet: I/O and network errors, a lost Ray actor,
    worker, node or object. Bad data, bad parameters and bugs (ValueError, a missing file,
    a task error raised inside Ray, ...) are deterministic."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _DETERMINISTIC_OS_ERRORS)
    if "ray" in sys.modules:  # a Ray error can only exist once Ray was imported
        import ray.exceptions  # lazy: only when Ray is already loaded (never imports it)

        return isinstance(exc, tuple(getattr(ray.exceptions, name) for name in _RAY_TRANSIENT))
    return False


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` of the tasks with retries: retry transient errors only."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def short_hash(obj) -> str:
    """10 hex digits identifying a JSON-able value (file and folder names of cached outputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Progress:
    """Progress of a long step, shown twice: a Prefect progress artifact (UI) and a tqdm bar (terminal).

    Call it with ``(done, total)`` or with a fraction ``(f,)``; updates of the artifact are
    throttled to whole percents.
    """

    def __init__(self, key: str, description: str):
        # sync context: Prefect's sync_compatible returns the UUID itself, not a coroutine
        self.id = cast(UUID, create_progress_artifact(progress=0.0, key=key, description=description))
        # a bar only on a terminal: in worker logs it would be a smear of carriage returns
        self.bar = tqdm(
            total=100,
            desc=description,
            unit="%",
            leave=False,
            bar_format="{l_bar}{bar}| {n:.0f}/{total}%",
            disable=not sys.stderr.isatty(),
        )
        self.last = -1

    def __call__(self, done: float, total: float = 1.0, *_):
        pct = int(100.0 * done / max(total, 1e-12))
        if pct == self.last:
            return
        self.bar.update(pct - max(self.last, 0))
        self.last = pct
        update_progress_artifact(self.id, progress=float(pct))
        if pct >= 100:
            self.bar.close()
