"""Tune's checkpoint API carries the trials: a retried trial resumes from its last reported
checkpoint, an interrupted grid resumes with ``Tuner.restore``, finished trials are kept.

The trainables count their steps in a file of their ``TrialWorkspace``, so what a trial
resumed from is visible in what it finished with; marker files count how often each trial
started, and make it fail exactly once at a chosen step.
"""

from __future__ import annotations

import json
import logging

import pytest

from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.ray_grid import SUMMARY, TrialsFailed, read_summary, run_grid, trial_dir, tune_grid


def make_count_steps():
    """The counting itself: steps 1..4 in the workspace ``ws``, from the count a resumed
    workspace holds; returns the summary and final metrics. Made inside a function, like the
    trainables that call it, so that Ray ships it by value (tests are not importable on workers)."""

    def count_steps(marks, x, ws):
        from pathlib import Path

        marks = Path(marks)
        with (marks / f"starts-{x}").open("a") as f:
            f.write("start\n")
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
        return {"best_path": str(ws.path / "model.txt"), "resumed_at": first}, {"done": 1, "progress": 1.0}

    return count_steps


def make_counting_trainable(marks):
    """A Tune function trainable of 4 steps that reports each with a checkpoint and, when the
    file ``<marks>/fail-<x>-at-<step>`` exists, removes it and raises at that step (once); x
    is the trial's point's ``x``. Made inside a function so that Ray ships it by value."""
    marks, count_steps = str(marks), make_count_steps()

    def counting(config: dict) -> None:
        from ssr_tasks.ray_grid import TrialWorkspace

        x = config["points"][config["label"]]["x"]
        with TrialWorkspace() as ws:
            summary, metrics = count_steps(marks, x, ws)
            ws.finish(summary, metrics)

    return counting


def make_counting_trial():
    """The same counting for ``run_grid``: a trainable of a ``Trial`` whose x is its config's
    lr_dni; marks is the grid's ``inputs``; the runner finishes the workspace."""
    count_steps = make_count_steps()

    def counting(trial):
        return count_steps(trial.inputs, trial.config.lr_dni, trial.workspace)

    return counting


def starts(marks, x) -> int:
    path = marks / f"starts-{x}"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def marks(tmp_path):
    path = tmp_path / "marks"
    path.mkdir()
    return path


def points(*xs) -> dict:
    return {f"x={x}": {"x": x} for x in xs}


@pytest.mark.parametrize("uri", [False, True], ids=["folder", "storage-uri"])
def test_a_retried_trial_resumes_from_its_last_checkpoint(ray_local, tmp_path, marks, monkeypatch, uri):
    if uri:  # SSR_RAY_STORAGE as a URI (pyarrow's file system of file://, as s3:// would be)
        monkeypatch.setenv("SSR_RAY_STORAGE", f"file://{tmp_path / 'bucket'}")
    (marks / "fail-1-at-3").touch()
    done = tune_grid(make_counting_trainable(marks), points(1), "retry", tmp_path / "ray", max_failures=1)
    assert starts(marks, 1) == 2 and not (marks / "fail-1-at-3").exists()
    assert list((tmp_path / ("bucket" if uri else "ray") / "retry").glob("*/checkpoint_*"))
    done["x=1"].to_directory(str(tmp_path / "got"))
    summary = json.loads((tmp_path / "got" / SUMMARY).read_text())
    assert summary == {"best_path": "model.txt", "resumed_at": 2}  # steps 1-2 were not run again
    assert (tmp_path / "got" / "model.txt").read_text() == "model of x=1 after step 4"


def test_an_interrupted_grid_is_restored_and_its_live_callbacks_are_this_calls(ray_local, tmp_path, marks, caplog):
    (marks / "fail-2-at-3").touch()
    storage = tmp_path / "ray"
    with pytest.raises(
        TrialsFailed, match=r"1 trial\(s\) of interrupted failed after 0 retries: .*x=2 at step 3"
    ) as err:
        tune_grid(make_counting_trainable(marks), points(1, 2), "interrupted", storage, max_failures=0)
    assert set(err.value.finished) == {"x=1"} and err.value.finished["x=1"] is not None

    fractions = []
    with caplog.at_level(logging.INFO, logger="ssr_tasks.ray_grid"):
        done = tune_grid(
            make_counting_trainable(marks),
            points(1, 2),
            "interrupted",
            storage,
            max_failures=0,
            progress=fractions.append,
        )
    assert starts(marks, 1) == 1 and starts(marks, 2) == 2  # the finished trial was kept, the failed one resumed
    done["x=2"].to_directory(str(tmp_path / "x2"))
    assert json.loads((tmp_path / "x2" / SUMMARY).read_text())["resumed_at"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "ssr_tasks.ray_grid"]
    assert any(line.startswith("resuming the Tune experiment") for line in lines)
    assert any(line.startswith("trial x=2: 100%") for line in lines)  # this call's callbacks saw the restored trial
    assert fractions and fractions[-1] == pytest.approx(1.0)


def test_run_grid_keeps_finished_trials_and_resumes_the_rest(ray_local, tmp_path, marks):
    (marks / "fail-0.2-at-2").touch()
    ckpt_root, storage = tmp_path / "trials", tmp_path / "ray"
    first, second = {"lr_dni": 0.1}, {"lr_dni": 0.2}

    def grid():
        return run_grid(
            make_counting_trial(),
            RetrievalTrainParams(),
            {"lr_dni": [0.1, 0.2]},
            name="toy",
            inputs=str(marks),
            ckpt_root=ckpt_root,
            storage_path=storage,
            max_failures=0,
        )

    with pytest.raises(TrialsFailed):
        grid()
    assert (trial_dir(ckpt_root, first) / SUMMARY).exists() and not trial_dir(ckpt_root, second).exists()
    [experiment] = [p for p in storage.iterdir() if p.name.startswith("toy-")]  # named after the configs and the grid

    results = grid()
    assert [r.label for r in results] == ["lr_dni=0.1", "lr_dni=0.2"] and [r.point for r in results] == [first, second]
    assert starts(marks, 0.1) == 1 and starts(marks, 0.2) == 2
    assert results[1].summary["resumed_at"] == 1 and results[1].folder == trial_dir(ckpt_root, second)
    assert results[1].summary["best_path"] == str(trial_dir(ckpt_root, second) / "model.txt")  # made absolute again
    assert read_summary(trial_dir(ckpt_root, first)) == results[0].summary
    assert not list(ckpt_root.glob(".lr_dni*"))  # no temp folder of an install left

    grid()  # everything finished: not even Tune runs again
    assert starts(marks, 0.1) == 1 and starts(marks, 0.2) == 2
    assert experiment.is_dir()


def test_a_grid_whose_experiment_state_was_cut_short_starts_afresh(ray_local, tmp_path, marks, caplog):
    """A process killed while Tune wrote its experiment state leaves the file empty (seen on a CI
    run of the resume flow test); Tuner.restore then brought the trial back without its config
    (KeyError 'points' on every retry). The grid is run afresh instead, the old folder kept aside."""
    (marks / "fail-2-at-3").touch()
    storage = tmp_path / "ray"
    with pytest.raises(TrialsFailed):
        tune_grid(make_counting_trainable(marks), points(1, 2), "cut", storage, max_failures=0)
    states = sorted((storage / "cut").glob("experiment_state-*.json"))
    assert states
    states[-1].write_text("")  # as a SIGKILL in the middle of the write leaves it

    with caplog.at_level(logging.INFO, logger="ssr_tasks.ray_grid"):
        done = tune_grid(make_counting_trainable(marks), points(1, 2), "cut", storage, max_failures=0)
    assert set(done) == {"x=1", "x=2"}
    assert starts(marks, 1) == 2 and starts(marks, 2) == 2  # both ran again from the start
    lines = [r.getMessage() for r in caplog.records if r.name == "ssr_tasks.ray_grid"]
    assert any("unreadable" in line and "starting the grid afresh" in line for line in lines), lines
    assert not any(line.startswith("resuming the Tune experiment") for line in lines)
    assert [p.name.split(".unreadable-")[0] for p in storage.glob("cut.unreadable-*")] == ["cut"]
