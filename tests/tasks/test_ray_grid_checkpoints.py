"""Tune's checkpoint API carries the trials: a retried trial resumes from its last reported
checkpoint, an interrupted grid resumes with ``Tuner.restore``, finished trials are kept.

The trainables count their steps in a file of their ``TrialWorkspace``, so what a trial
resumed from is visible in what it finished with; marker files count how often each trial
started, and make it fail exactly once at a chosen step.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from ssr_tasks.ray_grid import SUMMARY, TrialsFailed, read_summary, run_grid, trial_dir, tune_grid


def make_counting_trainable():
    """A trainable of 4 steps that reports each with a checkpoint and, when the file
    ``<marks>/fail-<x>-at-<step>`` exists, removes it and raises at that step (once).
    Made inside a function so that Ray ships it by value."""

    def counting(config: dict) -> None:
        from pathlib import Path

        from ssr_tasks.ray_grid import TrialWorkspace

        marks, x = Path(config["marks"]), config["x"]
        with (marks / f"starts-{x}").open("a") as f:
            f.write("start\n")
        with TrialWorkspace() as ws:
            count_file = ws.path / "count.txt"
            first = int(count_file.read_text()) if count_file.exists() else 0
            for step in range(first + 1, 5):
                fail = marks / f"fail-{x}-at-{step}"
                if fail.exists():
                    fail.unlink()
                    raise RuntimeError(f"transient failure of x={x} at step {step}")
                count_file.write_text(str(step))
                (ws.path / "model.txt").write_text(f"model of x={x} after step {step}")
                ws.report({"iteration": step, "progress": step / 4})
            ws.finish({"best_path": str(ws.path / "model.txt"), "resumed_at": first}, {"done": 1, "progress": 1.0})

    return counting


def starts(marks, x) -> int:
    path = marks / f"starts-{x}"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def marks(tmp_path):
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.mark.parametrize("uri", [False, True], ids=["folder", "storage-uri"])
def test_a_retried_trial_resumes_from_its_last_checkpoint(ray_local, tmp_path, marks, monkeypatch, uri):
    if uri:  # SSR_RAY_STORAGE as a URI (pyarrow's file system of file://, as s3:// would be)
        monkeypatch.setenv("SSR_RAY_STORAGE", f"file://{tmp_path / 'bucket'}")
    (marks / "fail-1-at-3").touch()
    done = tune_grid(make_counting_trainable(), "x", [1], {"marks": str(marks)}, "retry", tmp_path / "ray",
                     max_failures=1)
    assert starts(marks, 1) == 2 and not (marks / "fail-1-at-3").exists()
    assert list((tmp_path / ("bucket" if uri else "ray") / "retry").glob("*/checkpoint_*"))
    done[1].to_directory(str(tmp_path / "got"))
    summary = json.loads((tmp_path / "got" / SUMMARY).read_text())
    assert summary == {"best_path": "model.txt", "resumed_at": 2}  # steps 1-2 were not run again
    assert (tmp_path / "got" / "model.txt").read_text() == "model of x=1 after step 4"


def test_an_interrupted_grid_is_restored_and_its_live_callbacks_are_this_calls(ray_local, tmp_path, marks, caplog):
    (marks / "fail-2-at-3").touch()
    space, storage = {"marks": str(marks)}, tmp_path / "ray"
    with pytest.raises(TrialsFailed, match=r"1 trial\(s\) of interrupted failed after 0 retries: .*x=2 at step 3") as err:
        tune_grid(make_counting_trainable(), "x", [1, 2], space, "interrupted", storage, max_failures=0)
    assert set(err.value.finished) == {1} and err.value.finished[1] is not None

    fractions = []
    with caplog.at_level(logging.INFO, logger="ssr_tasks.ray_grid"):
        done = tune_grid(make_counting_trainable(), "x", [1, 2], space, "interrupted", storage, max_failures=0,
                         progress=fractions.append)
    assert starts(marks, 1) == 1 and starts(marks, 2) == 2  # the finished trial was kept, the failed one resumed
    done[2].to_directory(str(tmp_path / "x2"))
    assert json.loads((tmp_path / "x2" / SUMMARY).read_text())["resumed_at"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "ssr_tasks.ray_grid"]
    assert any(line.startswith("resuming the Tune experiment") for line in lines)
    assert any(line.startswith("trial x=2: 100%") for line in lines)  # this call's callbacks saw the restored trial
    assert fractions and fractions[-1] == pytest.approx(1.0)


@dataclass
class _Cfg:
    lr_dni: float = 0.0
    seed: int = 0


def test_run_grid_keeps_finished_trials_and_resumes_the_rest(ray_local, tmp_path, marks):
    (marks / "fail-0.2-at-2").touch()
    ckpt_root, storage = tmp_path / "trials", tmp_path / "ray"

    def grid():
        return run_grid(_rename_key(make_counting_trainable()), "toy", _Cfg(), [0.1, 0.2], {"marks": str(marks)},
                        ckpt_root, storage, max_failures=0)

    with pytest.raises(TrialsFailed):
        grid()
    assert (trial_dir(ckpt_root, 0.1) / SUMMARY).exists() and not trial_dir(ckpt_root, 0.2).exists()
    [experiment] = [p for p in storage.iterdir() if p.name.startswith("toy-")]  # named after the configs and the grid

    results = dict(grid())
    assert starts(marks, 0.1) == 1 and starts(marks, 0.2) == 2
    assert results[0.2]["resumed_at"] == 1
    assert results[0.2]["best_path"] == str(trial_dir(ckpt_root, 0.2) / "model.txt")  # made absolute again
    assert read_summary(trial_dir(ckpt_root, 0.1)) == results[0.1]
    assert not list(ckpt_root.glob(".lr_dni*"))  # no temp folder of an install left

    dict(grid())  # everything finished: not even Tune runs again
    assert starts(marks, 0.1) == 1 and starts(marks, 0.2) == 2
    assert experiment.is_dir()


def _rename_key(trainable):
    """The counting trainable under ``run_grid``'s key: ``x`` is the trial's lr_dni."""

    def by_lr(config: dict) -> None:
        trainable({**config, "x": config["lr_dni"]})

    return by_lr
