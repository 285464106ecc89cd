"""The Ray Tune grid runner of both tracks: one trial per point of a sweep, checkpointed through Tune.

``run_grid(trainable, base, sweep)`` sweeps any fields of a training config (a frozen
dataclass or pydantic model): one trial per point of the product of ``sweep``'s values. The
trainable receives a ``Trial``: the config itself with the point applied, its typed inputs
and its workspace. No parameter name appears here.

A trial trains in a local scratch folder (``TrialWorkspace``) and reports every validation
with ``tune.report(metrics, checkpoint=...)``: Tune copies the folder to its storage
(``storage_path``, or ``SSR_RAY_STORAGE``: a shared folder or an object store URI), so a
trial restarted on another node after a failure resumes from its last validation
(``tune.get_checkpoint()``), and no node needs the driver's file system for checkpoints.

``run_grid`` names the Tune experiment after everything the trials depend on. A rerun
after an interruption (a killed flow, trials that failed after their retries) finds the
experiment and resumes it with ``Tuner.restore``: finished trials are kept, the others
continue from their last checkpoint. Each finished trial's last checkpoint (its best
models and ``summary.json``) is then copied to ``trial_dir(ckpt_root, point)``, which later
steps read and a rerun skips.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from pydantic import BaseModel
from ray import tune

from ssr_tasks.config import sweep_points
from ssr_tasks.handoffs import TrialTracking, required
from ssr_tasks.liveness import PROCESS_TAG, process_tag
from ssr_tasks.taskkit import short_hash
from ssr_tasks.tracking import metric_name

SUMMARY = "summary.json"
KEEP_CHECKPOINTS = 2  # per trial in Tune's storage: the latest is all a resume needs, one spare
log = logging.getLogger(__name__)


ConfigT = TypeVar("ConfigT")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_label(point: Mapping[str, Any]) -> str:
    """A readable name of a sweep point: ``hidden=256,lr_dni=0.01`` (``base`` for the empty point)."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(point.items())) or "base"


def trial_dir(ckpt_root: Path, point: Mapping[str, Any]) -> Path:
    """Folder of the trial of this sweep point once it finished: its last checkpoint's files.
    Named by the readable label and a short hash of the point (file-system safe)."""
    label = re.sub(r"[^A-Za-z0-9=,._-]", "_", point_label(point))[:80]
    return Path(ckpt_root) / f"{label}-{short_hash(dict(point))[:8]}"


def apply(base: ConfigT, point: Mapping[str, Any]) -> ConfigT:
    """``base`` with the fields of ``point`` replaced: a pydantic model is validated again
    (an int field stays an int), a dataclass goes through ``dataclasses.replace``."""
    if isinstance(base, BaseModel):
        return type(base).model_validate({**base.model_dump(), **point})
    return dataclasses.replace(base, **point)  # type: ignore[type-var]


def _as_json(config: Any) -> Any:
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else dataclasses.asdict(config)


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

    def __enter__(self) -> TrialWorkspace:
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


# ---- one trial (a Ray worker) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Trial(Generic[ConfigT]):
    """What a trainable receives: ``config`` (the base config with ``point`` applied), ``label``
    (``point_label``), the typed ``inputs`` given to ``run_grid``, the ``device`` ("cpu" or
    "cuda") and the ``workspace`` it trains in (resumed from the trial's last checkpoint)."""

    config: ConfigT
    point: Mapping[str, Any]
    label: str
    inputs: Any
    device: str
    workspace: TrialWorkspace


# A trainable trains in trial.workspace, reports there, and returns (summary, final metrics).
Trainable = Callable[[Trial], tuple[dict, dict]]


def _run_trial(config: dict, train_fn: Trainable, base: Any, inputs: Any) -> None:
    """The Tune function trainable of every grid: builds the ``Trial`` and finishes it."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    point = config["points"][config["label"]]
    with TrialWorkspace() as ws:
        if ws.resumed:
            log.info("trial %s: resuming from its last Tune checkpoint", config["label"])
        trial = Trial(apply(base, point), point, config["label"], inputs, config["device"], ws)
        summary, metrics = train_fn(trial)
        ws.finish(summary, {**metrics, "done": 1, "progress": 1.0})


# ---- on the driver --------------------------------------------------------------------------------


LOGGED_KEYS = ("steps", "iteration", "loss", "val_acc", "val_map", "best_val_acc", "best_val_map", "best_steps")
LIVE_KEYS = ("loss", "val_acc", "val_map", "best_val_acc", "best_val_map", "progress")


def trial_line(label: str, result: Mapping[str, Any]) -> str:
    """One log line of a trial's report: ``trial lr_dni=0.1: 40% steps=1 iteration=300 loss=0.41 val_acc=0.62``."""
    fields = " ".join(
        f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
        for k in LOGGED_KEYS
        if k in result
    )
    pct = f" {100 * float(result['progress']):.0f}%" if "progress" in result else ""
    return f"trial {label}:{pct} {fields}".rstrip()


class GridCallback(tune.Callback):
    """The grid's one Tune callback, on the driver (the Prefect task's thread).

    - Progress: trials' reported ``progress`` (0..1) -> one overall fraction for ``progress``.
    - Logs: each trial's latest report at most every ``log_every_s`` seconds (and its last
      one), so training shows in the flow-run log while it runs.
    - MLflow (``tracking``): each trial gets a nested run under ``tracking.parent_run_id``
      when it starts (tag ``ssr.trial`` = its label, its point as parameters) and its reports
      are logged there as they arrive (step = Tune's report count). A trial restarted after
      a failure keeps its run.
    """

    def __init__(
        self,
        n_trials: int,
        progress: Callable[[float], None] | None = None,
        tracking: TrialTracking | None = None,
        log_every_s: float = 10.0,
    ):
        self.n_trials, self.progress, self.tracking, self.log_every_s = n_trials, progress, tracking, log_every_s
        self.client = MlflowClient(tracking.tracking_uri, tracking.tracking_uri) if tracking else None
        self.done: dict[str, float] = {}
        self.logged: dict[str, float] = {}
        self.runs: dict[str, str] = {}

    @staticmethod
    def _label(trial) -> str:
        return str(trial.config.get("label"))

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.client is None or trial.trial_id in self.runs:
            return
        label, point = self._label(trial), trial.config.get("points", {}).get(self._label(trial), {})
        tags = {
            **dict(self.tracking.tags),
            "mlflow.parentRunId": self.tracking.parent_run_id,
            "ssr.trial": label,
            PROCESS_TAG: process_tag(),
        }
        run = self.client.create_run(self.tracking.experiment_id, run_name=f"trial {label}", tags=tags)
        for key, value in point.items():
            self.client.log_param(run.info.run_id, key, value)
        self.runs[trial.trial_id] = run.info.run_id

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "progress" in result:
            self.done[trial.trial_id] = float(result["progress"])
            if self.progress is not None:
                self.progress(sum(self.done.values()) / self.n_trials)
        now = time.monotonic()
        if result.get("done") or now - self.logged.get(trial.trial_id, -1e9) >= self.log_every_s:
            self.logged[trial.trial_id] = now
            log.info(trial_line(self._label(trial), result))
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            step, stamp = int(result.get("training_iteration", 0)), int(time.time() * 1000)
            metrics = [
                Metric(
                    metric_name(k),
                    100 * float(result[k]) if k.startswith(("val_", "best_val_")) else float(result[k]),
                    stamp,
                    step,
                )
                for k in LIVE_KEYS
                if isinstance(result.get(k), (int, float))
            ]
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:
            self.client.set_terminated(self.runs[trial.trial_id], "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %s failed on a Ray worker (retried up to max_failures)", self._label(trial))
        if trial.trial_id in self.runs:
            self.client.set_terminated(self.runs[trial.trial_id], "FAILED")

    def on_experiment_end(self, trials, **info):
        if self.progress is not None and trials and all(t.status == "TERMINATED" for t in trials):
            self.progress(1.0)  # also counts trials a restored experiment had finished before


def grid_callback(
    n_trials: int, progress: Callable[[float], None] | None = None, tracking: TrialTracking | None = None
) -> GridCallback:
    """The callback of one grid (a seam: tests wrap it to act at a chosen report)."""
    return GridCallback(n_trials, progress, tracking)


# Tune pickles its RunConfig (callbacks included) with the experiment, and ``Tuner.restore``
# brings that copy back: Ray 2.60 has no public way to hand a restored experiment new
# callbacks. So the callback given to Tune holds only the experiment's name and forwards to
# the live callback registered here by the current call, which reports to this flow run and
# this MLflow parent run.
_LIVE_CALLBACKS: dict[str, GridCallback] = {}
_HOOKS = (
    "on_trial_start",
    "on_trial_restore",
    "on_trial_result",
    "on_trial_complete",
    "on_trial_error",
    "on_experiment_end",
)


class _Forward(tune.Callback):
    def __init__(self, name: str):
        self.name = name


def _forward(hook_name: str):
    def call(self, *args, **kwargs):
        # Looked up at call time through the module (not a pickled copy of its globals).
        live = importlib.import_module("ssr_tasks.ray_grid")._LIVE_CALLBACKS.get(self.name)
        if live is not None:
            getattr(live, hook_name)(*args, **kwargs)

    return call


for _hook in _HOOKS:
    setattr(_Forward, _hook, _forward(_hook))


class TrialsFailed(RuntimeError):
    """Trials that still failed after their retries; ``finished``: {label: checkpoint} of the others."""

    def __init__(self, message: str, finished: dict | None = None):
        super().__init__(message)
        self.finished = finished or {}


def tune_grid(
    trainable: Callable[[dict], None],
    points: Mapping[str, Mapping[str, Any]],
    name: str,
    storage_path: Path,
    max_failures: int = 2,
    progress: Callable[[float], None] | None = None,
    device: str = "cpu",
    tracking: TrialTracking | None = None,
) -> dict[str, Any]:
    """Run the Tune function ``trainable`` once per point as the Tune experiment ``name``;
    returns {label: the trial's latest ``tune.Checkpoint`` or None} for the trials that
    finished. Raises with the reasons if trials still fail after ``max_failures`` retries (a
    retry resumes from the trial's latest checkpoint).

    points: {label: point}; a trial's config is ``{"label", "points", "device", "threads"}``.
    When the experiment ``<storage>/<name>`` exists (an earlier call was interrupted or
    failed) it is resumed with ``Tuner.restore``, whatever ``points`` says: an experiment is
    only resumed as it was defined, so ``name`` must identify its definition (``run_grid``
    hashes it). A trial asks Ray for a GPU exactly when ``device`` is "cuda". Tune's storage
    is ``storage_path``, or ``SSR_RAY_STORAGE`` when set (a shared folder or an object store
    URI such as ``s3://bucket/ray``, for a cluster whose nodes share no file system).
    """
    if not points:
        return {}
    # Tune's console tables are noise in a Prefect log; trial progress is logged by the callback.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = os.environ.get("SSR_RAY_STORAGE") or str(storage_path)
    experiment = f"{storage.rstrip('/')}/{name}"
    trainable = tune.with_resources(trainable, {"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": 1})
    _LIVE_CALLBACKS[name] = grid_callback(len(points), progress, tracking)
    try:
        if tune.Tuner.can_restore(experiment) and not _unreadable_state(experiment):
            log.info(
                "resuming the Tune experiment %s: finished trials are kept, the others continue from "
                "their last checkpoint",
                experiment,
            )
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            space = {
                "label": tune.grid_search(list(points)),
                "points": {k: dict(v) for k, v in points.items()},
                "device": device,
                "threads": 1,
            }
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                    verbose=0,
                    callbacks=[_Forward(name)],
                ),
            )
        grid = tuner.fit()
    finally:
        _LIVE_CALLBACKS.pop(name, None)
    results = [grid[i] for i in range(len(grid))]  # ResultGrid is indexable (no __iter__ in its type)
    finished = {required(r.config, "a trial's config")["label"]: r.checkpoint for r in results if r.error is None}
    if grid.errors:
        msgs = "; ".join(str(e).strip().splitlines()[-1] for e in grid.errors)
        raise TrialsFailed(
            f"{len(grid.errors)} trial(s) of {name} failed after {max_failures} retries: {msgs}", finished
        )
    return finished


def _unreadable_state(experiment: str) -> bool:
    """True when a local experiment's newest ``experiment_state-*.json`` cannot be read: a process
    killed while Tune was writing it leaves it empty, and ``Tuner.restore`` then brings the
    trials back without their configs (every retry fails with KeyError 'points'). Such an
    experiment is moved aside (``<name>.unreadable-<time>``) and the grid starts afresh; its
    trials' finished outputs outside Tune (``run_grid``'s trial folders) are still reused."""
    folder = Path(experiment)
    states = sorted(folder.glob("experiment_state-*.json")) if folder.is_dir() else []
    if not states:
        return False
    try:
        json.loads(states[-1].read_text())
        return False
    except (OSError, ValueError):
        aside = folder.with_name(f"{folder.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "%s: unreadable (%s is empty or cut short); starting the grid afresh, old folder kept as %s",
            experiment,
            states[-1].name,
            aside,
        )
        folder.rename(aside)
        return True


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


@dataclass(frozen=True)
class TrialResult(Generic[ConfigT]):
    """A finished trial: its config (the base with ``point`` applied), its label, the folder
    holding its last checkpoint's files, and the summary it left (paths absolute)."""

    config: ConfigT
    point: Mapping[str, Any]
    label: str
    folder: Path
    summary: dict


def run_grid(
    trainable: Trainable,
    base: ConfigT,
    sweep: Mapping[str, Sequence[Any]],
    *,
    name: str,
    inputs: Any,
    ckpt_root: Path,
    storage_path: Path,
    device: str = "cpu",
    max_failures: int = 2,
    progress: Callable[[float], None] | None = None,
    tracking: TrialTracking | None = None,
) -> list[TrialResult[ConfigT]]:
    """Train one trial per point of ``sweep`` (field -> values of ``base``, their product);
    returns the trials' results in the sweep's order.

    base: the training config (a frozen dataclass or pydantic model); each trial receives it
    with its point applied, inside a ``Trial``. inputs: what the trainable reads (a frozen
    dataclass of paths and scalars, shipped to the trials as it is). The Tune experiment is
    ``<name>-<hash of the base, the inputs, the sweep and the device>``; finished trials land
    in ``trial_dir(ckpt_root, point)`` and are not run again.
    """
    ckpt_root = Path(ckpt_root)
    points = {point_label(p): p for p in sweep_points(sweep)}
    pending = {label: p for label, p in points.items() if not (trial_dir(ckpt_root, p) / SUMMARY).exists()}
    identity = {
        "base": _as_json(base),
        "inputs": repr(inputs),
        "sweep": {k: list(v) for k, v in sweep.items()},
        "device": device,
    }
    experiment = f"{name}-{short_hash(identity)}"
    fn = tune.with_parameters(_run_trial, train_fn=trainable, base=base, inputs=inputs)
    try:
        finished = tune_grid(fn, pending, experiment, storage_path, max_failures, progress, device, tracking)
    except TrialsFailed as err:
        for label, ckpt in err.finished.items():  # keep what finished; a rerun resumes the rest
            if ckpt is not None:
                _install(ckpt, trial_dir(ckpt_root, points[label]))
        raise
    for label, ckpt in finished.items():
        if ckpt is None:
            raise RuntimeError(f"trial {label} of {experiment} finished without a checkpoint")
        _install(ckpt, trial_dir(ckpt_root, points[label]))
    return [
        TrialResult(apply(base, p), p, label, trial_dir(ckpt_root, p), read_summary(trial_dir(ckpt_root, p)))
        for label, p in points.items()
    ]
