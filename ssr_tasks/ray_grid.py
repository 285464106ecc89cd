"""The Ray Tune grid runner of both tracks: one trial per swept value, resumable.

``run_grid`` trains one trial per ``lr_dni`` in parallel (one GPU per trial when the device
is "cuda"). A trial's checkpoints live under ``trial_dir(ckpt_root, lr_dni)``, a name fixed
by its parameters, so a rerun finds them: finished trials (a ``summary.json`` there) are
not run again, interrupted ones resume inside the trainable.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.tracking import live_trial_callback

SUMMARY = "summary.json"
log = logging.getLogger(__name__)


def trial_dir(ckpt_root: Path, lr_dni: float) -> Path:
    """Checkpoint folder of the trial with this ``lr_dni``."""
    return Path(ckpt_root) / f"lr_dni={lr_dni:g}"


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
    import time

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

    return _Progress()


def tune_grid(trainable: Callable[[dict], None], key: str, values: list, base_space: dict, name: str,
              storage_path: Path, max_failures: int = 2, progress: Callable[[float], None] | None = None,
              device: str = "cpu", tracking: TrialTracking | None = None) -> None:
    """Run ``trainable`` for each value of ``key``; raise with the reasons if trials still fail after retries.

    Each trial's config holds ``device`` ("cpu" or "cuda", resolved by ``ssr_tasks.device``)
    and asks Ray for a GPU exactly when it is "cuda". ``progress`` receives the overall
    fraction done whenever a trial reports. ``tracking``: each trial logs to its nested
    MLflow run while it trains (``ssr_tasks.tracking.live_trial_callback``). Tune's results
    go to ``storage_path``, or to ``SSR_RAY_STORAGE`` when set (a shared folder or an object
    store URI such as ``s3://bucket/ray``, for a cluster whose nodes share no file system).
    """
    from ray import tune  # Ray is heavy and only needed where a grid runs

    if not values:
        return
    # Tune's console tables are noise in a Prefect log; trial progress is logged by the trainable.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    resources = {"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": 1}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={**base_space, key: tune.grid_search(values), "device": device, "threads": 1},
        run_config=tune.RunConfig(
            name=name,
            storage_path=os.environ.get("SSR_RAY_STORAGE") or str(storage_path),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
            callbacks=[progress_callback(len(values), progress, key)]
            + ([live_trial_callback(tracking, key)] if tracking is not None else []),
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        msgs = "; ".join(str(e).strip().splitlines()[-1] for e in grid.errors)
        raise RuntimeError(f"{len(grid.errors)} trial(s) of {name} failed after {max_failures} retries: {msgs}")


def run_grid(trainable: Callable[[dict], None], name: str, base: Any, lr_grid: list[float], inputs: Mapping[str, str],
             ckpt_root: Path, storage_path: Path, device: str = "cpu", max_failures: int = 2,
             progress: Callable[[float], None] | None = None,
             tracking: TrialTracking | None = None) -> list[tuple[float, dict]]:
    """Train one trial per ``lr_dni`` of ``lr_grid``; returns (lr_dni, summary read from disk) per trial.

    base: the training config (a dataclass with an ``lr_dni`` field, replaced per trial);
    inputs: file paths the trainable reads (strings, they travel in the Tune config).
    A trial's config is ``{"train": base without lr_dni, **inputs, "ckpt_root", "lr_dni",
    "device", "threads"}``; the trainable writes ``trial_dir(...)/summary.json`` when done.
    """
    pending = [lr for lr in lr_grid if not (trial_dir(ckpt_root, lr) / SUMMARY).exists()]
    space = {"train": {k: v for k, v in asdict(base).items() if k != "lr_dni"}, **inputs, "ckpt_root": str(ckpt_root)}
    tune_grid(trainable, "lr_dni", pending, space, name, storage_path, max_failures, progress, device, tracking)
    return [(lr, json.loads((trial_dir(ckpt_root, lr) / SUMMARY).read_text())) for lr in lr_grid]
