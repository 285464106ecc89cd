"""The ``ssr`` command, SIGKILLed once Tune's driver has the first trial result (test helper).

Used by test_flow_resume: it runs ``flows.cli.main`` in this process with the grid's
progress callback wrapped, so the flow process (the Ray driver) dies right after a trial
reported its first validation (its ``last.pt`` is written by then).
"""
from __future__ import annotations

import os
import signal
import sys

from flows.cli import main
from ssr_tasks import ray_grid

product_callback = ray_grid.progress_callback


def progress_callback(n_trials, progress, *args, **kwargs):
    callback = product_callback(n_trials, progress, *args, **kwargs)
    on_trial_result = callback.on_trial_result

    def killed_after(*args, **kwargs):
        on_trial_result(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    callback.on_trial_result = killed_after
    return callback


if __name__ == "__main__":
    ray_grid.progress_callback = progress_callback
    sys.exit(main())
