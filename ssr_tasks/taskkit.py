"""What every Prefect task of the pipeline shares: the cache policy, short content hashes
for file names, and the progress reporter.

Tasks return file paths inside typed hand-offs (never tensors). Cache keys are the inputs
plus the task source, with results persisted, so a rerun of a deployment reuses prepared
data, backbones, features and finished trials; the plain functions are idempotent as well
(they skip outputs that already exist), which also covers reruns whose Prefect cache was
lost.
"""
from __future__ import annotations

import hashlib
import json
import sys

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from tqdm.auto import tqdm

CACHE = INPUTS + TASK_SOURCE


def short_hash(obj) -> str:
    """10 hex digits identifying a JSON-able value (file and folder names of cached outputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Progress:
    """Progress of a long step, shown twice: a Prefect progress artifact (UI) and a tqdm bar (terminal).

    Call it with ``(done, total)`` or with a fraction ``(f,)``; updates of the artifact are
    throttled to whole percents.
    """

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        # a bar only on a terminal: in worker logs it would be a smear of carriage returns
        self.bar = tqdm(total=100, desc=description, unit="%", leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total}%",
                        disable=not sys.stderr.isatty())
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
