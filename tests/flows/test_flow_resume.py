"""The flow process SIGKILLed during SSR training, then the same command again.

``ssr run fewshot --preset reproduce-fewshot-tiny`` runs the flow in its own process (the
Ray driver). The killed run goes through ``ssr_killed_mid_training.py``, which kills that
process from Tune's driver-side callback when a trial reports its second validation (its
first Tune checkpoint is recorded by then). The rerun restores the Tune experiment
(``Tuner.restore``), the trial resumes from that checkpoint, and the data, backbone and
features are reused; its results table and SSR weights equal those of an undisturbed run in
another run folder, started at the same time as the killed run (the two overlap on 2 cores).
All three runs take the preset with the Baseline / k-reciprocal / SSR rows only (``--set
evaluation.methods=...``): the rows the test compares, without the peers' cost.

A SIGKILLed flow process leaves orphans behind: Prefect's temporary API server and Ray's
dashboard and runtime-env agents (Ray's GCS, raylet and workers die with the driver). The
rerun works with them still alive; the test reaps them at the end. Output goes to files, not
pipes, because the orphans keep inherited pipes open.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SSR = [str(Path(sys.executable).parent / "ssr")]
SSR_KILLED = [sys.executable, str(Path(__file__).with_name("ssr_killed_mid_training.py"))]
_GROUPS: list[int] = []  # process groups of the runs, reaped at the end
METHODS = '["baseline", "k-reciprocal", "ssr"]'


def _home(tmp_path: Path, name: str, ssr_home: Path) -> Path:
    home = tmp_path / name
    home.mkdir()
    (home / "data").symlink_to(ssr_home / "data")  # the session's rendered dataset
    return home


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str, pgid: int):
        self.returncode, self.stdout, self.stderr, self.pgid = returncode, stdout, stderr, pgid


def _start(home: Path, command: list[str] = SSR) -> tuple[subprocess.Popen, Path, Path]:
    # each home its own Prefect home: the undisturbed run and the killed run start their
    # temporary Prefect servers at the same time, and must not share one SQLite database
    env = {**os.environ, "SSR_HOME": str(home), "PREFECT_HOME": str(home / "prefect-home")}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(key, None)
    tag = f"{home.name}-{os.urandom(3).hex()}"
    out, err = home.parent / f"{tag}.out", home.parent / f"{tag}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [
                *command,
                "run",
                "fewshot",
                "--preset",
                "reproduce-fewshot-tiny",
                "--set",
                f"evaluation.methods={METHODS}",
            ],
            env=env,
            stdout=fo,
            stderr=fe,
            start_new_session=True,
        )
    _GROUPS.append(proc.pid)  # reaped at the end, whatever happens
    return proc, out, err


def _finish(started: tuple[subprocess.Popen, Path, Path]) -> Run:
    proc, out, err = started
    rc = proc.wait(timeout=600)
    return Run(rc, out.read_text(), err.read_text(), proc.pid)


def _run(home: Path, command: list[str] = SSR) -> Run:
    return _finish(_start(home, command))


def _reap(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _table(stdout: str) -> list[list[str]]:
    """Method and accuracy cells of the Baseline / k-reciprocal / SSR rows (ms and memory per
    episode are measured anew by every run, so they are left out)."""
    lines = stdout.splitlines()
    header = next((line for line in lines if re.match(r"\| *method *\|", line)), "")
    keep = [i for i, cell in enumerate(header.split("|")) if cell.strip() == "method" or "acc" in cell]
    return [
        [line.split("|")[i].strip() for i in keep]
        for line in lines
        if re.match(r"\| *(Baseline|k-reciprocal|SSR)", line)
    ]


@pytest.mark.slow
def test_flow_killed_during_training_resumes_to_the_undisturbed_result(tmp_path, glyphs_small, ssr_home):
    try:
        _kill_and_resume(tmp_path, ssr_home)
    finally:
        while _GROUPS:
            _reap(_GROUPS.pop())


def _kill_and_resume(tmp_path: Path, ssr_home: Path) -> None:
    clean_home = _home(tmp_path, "clean", ssr_home)
    undisturbed = _start(clean_home)  # runs beside the killed run and its rerun, in its own folder

    home = _home(tmp_path, "killed", ssr_home)
    killed = _run(home, SSR_KILLED)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(home.rglob("checkpoint_*/steps1/last.pt")) and not list(home.rglob("summary.json"))  # mid-training
    assert not _table(killed.stdout)
    cached = sorted(home.rglob("features*.parquet")) + sorted((home / "backbones").glob("*.pt"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]

    resumed = _run(home)
    clean = _finish(undisturbed)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert len(_table(clean.stdout)) == 3, clean.stdout
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _table(resumed.stdout) == _table(clean.stdout)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # backbone and features reused, not redone
    assert "resuming the Tune experiment" in resumed.stdout + resumed.stderr
    # The killed process's MLflow runs (the pipeline's and its trial's) were ended as KILLED.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = sorted(r.info.status for r in runs)
    assert "RUNNING" not in statuses and statuses.count("KILLED") >= 2, statuses
    # Resumed, not restarted: the first validation of steps 1 is in Tune's record of the trial once.
    [record] = home.rglob("ray_results/*/*/result.json")
    reported = [
        (r["steps"], r["iteration"]) for r in map(json.loads, record.read_text().splitlines()) if "val_acc" in r
    ]
    assert reported.count(reported[0]) == 1 and reported[0][0] == 1, reported

    [a_sum], [b_sum] = list(clean_home.rglob("trials/*/summary.json")), list(home.rglob("trials/*/summary.json"))
    a_s, b_s = json.loads(a_sum.read_text()), json.loads(b_sum.read_text())
    assert (b_s["best_val"], b_s["best_steps"]) == (a_s["best_val"], a_s["best_steps"])
    for stage in ("steps1", "steps2"):  # every stage's best weights, the registered model's included
        a = torch.load(a_sum.parent / stage / "best.pt", weights_only=True)
        b = torch.load(b_sum.parent / stage / "best.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
