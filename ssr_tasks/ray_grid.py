"""The Ray Tune grid runner of both tracks: one trial per swept value, checkpointed through Tune.

A trial trains in a local scratch folder (``TrialWorkspace``) and reports every validation
with ``tune.report(metrics, checkpoint=...)``: Tune copies the folder to its storage
(``storage_path``, or ``SSR_RAY_STORAGE``: a shared folder or an object store URI), so a
trial restarted on another node after a failure resumes from its last validation
(``tune.get_checkpoint()``), and no node needs the driver's file system for checkpoints.

``run_grid`` names the Tune experiment after everything the trials depend on. A rerun
after an interruption (a killed flow, trials that failed after their retries) finds the
experiment and resumes it with ``Tuner.restore``: finished trials are kept, the others
continue from their last checkpoint. Each finished trial's last checkpoint (its best
models and ``summary.json``) is then copied to ``trial_dir(ckpt_root, value)``, which later
steps read and a rerun skips.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.taskkit import short_hash
from ssr_tasks.tracking import live_trial_callback

SUMMARY = "summary.json"
KEEP_CHECKPOINTS = 2  # per trial in Tune's storage: the latest is all a resume needs, one spare
log = logging.getLogger(__name__)


def trial_dir(ckpt_root: Path, lr_dni: float) -> Path:
    """Folder of the trial with this ``lr_dni`` once it finished: its last checkpoint's files."""
    return Path(ckpt_root) / f"lr_dni={lr_dni:g}"


# ---- inside a trial (a Ray worker) ---------------------------------------------------------------


def _rebase_paths(obj: Any, fn: Callable[[str], str]) -> Any:
    """``obj`` (a JSON-able summary) with every ``best_path`` value mapped by ``fn``."""
    if isinstance(obj, dict):
        return {k: fn(v) if k == "best_path" and isinstance(v, str) else _rebase_paths(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase_paths(v, fn) for v in obj]
    return obj


class TrialWorkspace:
    """The scratch folder a Tune trial trains in, filled from the trial's latest checkpoint.

    Use it as a context manager inside a function trainable: ``path`` is a fresh local
    folder holding the files of ``tune.get_checkpoint()`` when Tune restarts or restores the
    trial (``resumed`` is then True), so the training loop resumes from the files it left.
    ``report`` sends metrics with the folder as a checkpoint; ``finish`` leaves the summary
    (paths relative to the folder) and reports it last. The folder is removed on exit.
    """

    def __enter__(self) -> "TrialWorkspace":
        from ray import tune  # Ray is heavy and only needed where a grid runs

        self.path = Path(tempfile.mkdtemp(prefix="ssr-trial-"))
        ckpt = tune.get_checkpoint()
        self.resumed = ckpt is not None
        if ckpt is not None:
            ckpt.to_directory(str(self.path))
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        """Report ``metrics`` with the folder's current files as the trial's checkpoint (copied
        to Tune's storage before this returns)."""
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(self.path)))

    def finish(self, summary: dict, metrics: dict) -> None:
        """Write ``summary`` (``best_path`` values made relative to the folder) as ``summary.json``
        and report it with ``metrics`` as the trial's last checkpoint."""
        root = self.path.resolve()
        rel = _rebase_paths(summary, lambda p: str(Path(p).resolve().relative_to(root)))
        (self.path / SUMMARY).write_text(json.dumps(rel))
        self.report(metrics)


def read_summary(folder: Path) -> dict:
    """The summary a finished trial left in ``folder``, its ``best_path`` values made absolute."""
    folder = Path(folder)
    return _rebase_paths(json.loads((folder / SUMMARY).read_text()), lambda p: str(folder / p))


# ---- on the driver --------------------------------------------------------------------------------


LOGGED_KEYS = ("steps", "iteration", "loss", "val_acc", "val_map", "best_val_acc", "best_val_map", "best_steps")


def trial_line(key: str, config: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """One log line of a trial's report: ``trial lr_dni=0.1: 40% steps=1 iteration=300 loss=0.41 val_acc=0.62``."""
    fields = " ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
                      for k in LOGGED_KEYS if k in result)
    pct = f" {100 * float(result['progress']):.0f}%" if "progress" in result else ""
    return f"trial {key}={config.get(key)}:{pct} {fields}".rstrip()


def progress_callback(n_trials: int, progress: Callable[[float], None] | None, key: str = "lr_dni",
                      log_every_s: float = 10.0):
    """A Tune callback on the driver (the Prefect task's thread): trials' reported ``progress``
    (0..1) -> one overall fraction for ``progress``, and each trial's latest report logged
    at most every ``log_every_s`` seconds (and its last one), so training shows in the
    flow-run logs while it runs (the trials' own stdout stays on the Ray workers)."""
    from ray import tune  # Ray is heavy and only needed where a grid runs

    class _Progress(tune.Callback):
        def __init__(self):
            self.done: dict[str, float] = {}
            self.logged: dict[str, float] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "progress" in result:
                self.done[trial.trial_id] = float(result["progress"])
                if progress is not None:
                    progress(sum(self.done.values()) / n_trials)
            now = time.monotonic()
            if result.get("done") or now - self.logged.get(trial.trial_id, -1e9) >= log_every_s:
                self.logged[trial.trial_id] = now
                log.info(trial_line(key, trial.config, result))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s=%s failed on a Ray worker (retried up to max_failures)", key, trial.config.get(key))

        def on_experiment_end(self, trials, **info):
            if progress is not None and trials and all(t.status == "TERMINATED" for t in trials):
                progress(1.0)  # also counts trials a restored experiment had finished before

    return _Progress()


# The callbacks of the experiments running in this process, by experiment name. Tune pickles
# its RunConfig (callbacks included) with the experiment and ``Tuner.restore`` brings that
# copy back; the copy holds only the name and forwards to this run's live callbacks, so a
# restored experiment reports to the current flow run and MLflow parent run.
_LIVE_CALLBACKS: dict[str, list] = {}
_HOOKS = ("on_trial_start", "on_trial_restore", "on_trial_result", "on_trial_complete", "on_trial_error",
          "on_experiment_end")


def _forwarding_callback(name: str):
    from ray import tune

    def hook(hook_name: str):
        def call(self, *args, **kwargs):
            # Looked up at call time through the module (not a pickled copy of its globals).
            live = importlib.import_module("ssr_tasks.ray_grid")._LIVE_CALLBACKS.get(self.name, ())
            for cb in live:
                getattr(cb, hook_name)(*args, **kwargs)
        return call

    cls = type("ForwardToLiveCallbacks", (tune.Callback,), {h: hook(h) for h in _HOOKS})
    cb = cls()
    cb.name = name
    return cb


class TrialsFailed(RuntimeError):
    """Trials that still failed after their retries; ``finished``: {value: checkpoint} of the others."""

    def __init__(self, message: str, finished: dict | None = None):
        super().__init__(message)
        self.finished = finished or {}


def tune_grid(trainable: Callable[[dict], None], key: str, values: list, base_space: dict, name: str,
              storage_path: Path, max_failures: int = 2, progress: Callable[[float], None] | None = None,
              device: str = "cpu", tracking: TrialTracking | None = None) -> dict[Any, Any]:
    """Run ``trainable`` for each value of ``key`` as the Tune experiment ``name``; returns
    {value: the trial's latest ``tune.Checkpoint`` or None} for the trials that finished.
    Raises with the reasons if trials still fail after ``max_failures`` retries (a retry
    resumes from the trial's latest checkpoint).

    When the experiment ``<storage>/<name>`` exists (an earlier call was interrupted or
    failed) it is resumed with ``Tuner.restore``, whatever ``values`` says: an experiment is
    only resumed as it was defined, so ``name`` must identify its definition (``run_grid``
    hashes it).

    Each trial's config holds ``device`` ("cpu" or "cuda", resolved by ``ssr_tasks.device``)
    and asks Ray for a GPU exactly when it is "cuda". ``progress`` receives the overall
    fraction done whenever a trial reports. ``tracking``: each trial logs to its nested
    MLflow run while it trains (``ssr_tasks.tracking.live_trial_callback``). Tune's storage
    is ``storage_path``, or ``SSR_RAY_STORAGE`` when set (a shared folder or an object store
    URI such as ``s3://bucket/ray``, for a cluster whose nodes share no file system).
    """
    from ray import tune  # Ray is heavy and only needed where a grid runs

    if not values:
        return {}
    # Tune's console tables are noise in a Prefect log; trial progress is logged by the callbacks.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = os.environ.get("SSR_RAY_STORAGE") or str(storage_path)
    experiment = f"{storage.rstrip('/')}/{name}"
    trainable = tune.with_resources(trainable, {"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": 1})
    _LIVE_CALLBACKS[name] = [progress_callback(len(values), progress, key)] \
        + ([live_trial_callback(tracking, key)] if tracking is not None else [])
    try:
        if tune.Tuner.can_restore(experiment):
            log.info("resuming the Tune experiment %s: finished trials are kept, the others continue from "
                     "their last checkpoint", experiment)
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={**base_space, key: tune.grid_search(values), "device": device, "threads": 1},
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                    verbose=0,
                    callbacks=[_forwarding_callback(name)],
                ),
            )
        grid = tuner.fit()
    finally:
        _LIVE_CALLBACKS.pop(name, None)
    finished = {r.config[key]: r.checkpoint for r in grid if r.error is None}
    if grid.errors:
        msgs = "; ".join(str(e).strip().splitlines()[-1] for e in grid.errors)
        raise TrialsFailed(f"{len(grid.errors)} trial(s) of {name} failed after {max_failures} retries: {msgs}", finished)
    return finished


def _install(checkpoint, dest: Path) -> None:
    """Copy a finished trial's last checkpoint to ``dest`` (atomically: a temp folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        checkpoint.to_directory(str(tmp))
        if not (tmp / SUMMARY).exists():
            raise RuntimeError(f"{checkpoint.path}: the last checkpoint of a finished trial has no {SUMMARY}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_grid(trainable: Callable[[dict], None], name: str, base: Any, lr_grid: list[float], inputs: Mapping[str, str],
             ckpt_root: Path, storage_path: Path, device: str = "cpu", max_failures: int = 2,
             progress: Callable[[float], None] | None = None,
             tracking: TrialTracking | None = None) -> list[tuple[float, dict]]:
    """Train one trial per ``lr_dni`` of ``lr_grid``; returns (lr_dni, summary) per trial, in grid order.

    base: the training config (a dataclass with an ``lr_dni`` field, replaced per trial);
    inputs: file paths the trainable reads (strings, they travel in the Tune config).
    A trial's config is ``{"train": base without lr_dni, **inputs, "lr_dni", "device",
    "threads"}``; the trainable trains in a ``TrialWorkspace`` and ends with ``finish``.
    The Tune experiment is ``<name>-<hash of the configs and the grid>``; finished trials
    land in ``trial_dir(ckpt_root, lr_dni)`` and are not run again.
    """
    ckpt_root = Path(ckpt_root)
    pending = [lr for lr in lr_grid if not (trial_dir(ckpt_root, lr) / SUMMARY).exists()]
    space = {"train": {k: v for k, v in asdict(base).items() if k != "lr_dni"}, **inputs}
    experiment = f"{name}-{short_hash({'space': space, 'lr_dni': list(lr_grid), 'device': device})}"
    try:
        finished = tune_grid(trainable, "lr_dni", pending, space, experiment, storage_path, max_failures, progress,
                             device, tracking)
    except TrialsFailed as err:
        for lr, ckpt in err.finished.items():  # keep what finished; a rerun resumes the rest
            if ckpt is not None:
                _install(ckpt, trial_dir(ckpt_root, lr))
        raise
    for lr, ckpt in finished.items():
        if ckpt is None:
            raise RuntimeError(f"trial lr_dni={lr:g} of {experiment} finished without a checkpoint")
        _install(ckpt, trial_dir(ckpt_root, lr))
    return [(lr, read_summary(trial_dir(ckpt_root, lr))) for lr in lr_grid]
