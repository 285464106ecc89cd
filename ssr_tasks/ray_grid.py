"""A Ray Tune grid over one swept parameter, one trial per value (GPU per trial when the cluster has GPUs)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def _progress_callback(n_trials: int, progress: Callable[[float], None]):
    """A Tune callback turning trials' reported ``progress`` (0..1) into one overall fraction."""
    from ray import tune

    from ssr_tasks.faults import maybe_kill

    class _Progress(tune.Callback):
        def __init__(self):
            self.done: dict[str, float] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "progress" in result:
                self.done[trial.trial_id] = float(result["progress"])
                progress(sum(self.done.values()) / n_trials)
            maybe_kill("tune-driver-after-trial-result")  # test-only: the flow process dies mid-training

    return _Progress()


def tune_grid(trainable: Callable[[dict], None], key: str, values: list, base_space: dict, name: str,
              storage_path: Path, max_failures: int = 2, progress: Callable[[float], None] | None = None) -> None:
    """Run ``trainable`` for each value of ``key``; raise with the reasons if trials still fail after retries.

    ``progress`` receives the overall fraction done whenever a trial reports.
    """
    import os

    from ray import tune

    from ssr_tasks.services import cluster_has_gpu

    if not values:
        return
    # Tune's console tables are noise in a Prefect log; trial progress is logged by the trainable.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    use_gpu = cluster_has_gpu()
    resources = {"cpu": 1, "gpu": 1} if use_gpu else {"cpu": 1}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={**base_space, key: tune.grid_search(values), "use_gpu": use_gpu, "threads": 1},
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
            callbacks=[_progress_callback(len(values), progress)] if progress else None,
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        msgs = "; ".join(str(e).strip().splitlines()[-1] for e in grid.errors)
        raise RuntimeError(f"{len(grid.errors)} trial(s) of {name} failed after {max_failures} retries: {msgs}")
