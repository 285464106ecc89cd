"""The ``ssr`` command, SIGKILLed in the middle of SSR training (test helper).

Used by test_flow_resume: it runs ``flows.cli.main`` in this process with the grid's
callback (``grid_callback``) wrapped, so the flow process (the Ray driver) dies when a trial reports
its second validation. By then the trial's first Tune checkpoint is in Tune's experiment
state: the state is saved at every step of Tune's loop here (``TUNE_GLOBAL_CHECKPOINT_S=0``;
by default at most every 10 s, which only moves the point a killed run resumes from).
"""

from __future__ import annotations

import os
import signal
import sys

from flows.cli import main
from ssr_tasks import ray_grid

product_callback = ray_grid.grid_callback


def grid_callback(n_trials, progress=None, *args, **kwargs):
    callback = product_callback(n_trials, progress, *args, **kwargs)
    on_trial_result = callback.on_trial_result
    seen = []

    def killed_at_second_validation(iteration, trials, trial, result, **info):
        on_trial_result(iteration, trials, trial, result, **info)
        if "val_acc" in result:
            seen.append(result["iteration"])
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    callback.on_trial_result = killed_at_second_validation
    return callback


if __name__ == "__main__":
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    ray_grid.grid_callback = grid_callback
    sys.exit(main())
