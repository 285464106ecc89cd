"""Trials' reports reach the driver's log (the Prefect flow-run log) while they train."""

from __future__ import annotations

import logging

from ssr_tasks.ray_grid import point_label, trial_line, tune_grid


def test_trial_reports_are_logged_on_the_driver(ray_local, tmp_path, caplog, monkeypatch):
    def _trainable(config: dict) -> None:  # nested: Ray ships it by value (tests are not importable on workers)
        from ray import tune

        for i in range(3):
            tune.report({"iteration": i + 1, "loss": 1.0 / (i + 1), "progress": (i + 1) / 3})

    fractions = []
    monkeypatch.setenv("SSR_RAY_STORAGE", str(tmp_path / "shared"))  # Tune's storage moved, e.g. to an object store
    with caplog.at_level(logging.INFO, logger="ssr_tasks.ray_grid"):
        tune_grid(
            _trainable,
            {"lr_dni=0.1": {"lr_dni": 0.1}, "lr_dni=0.2": {"lr_dni": 0.2}},
            "progress-test",
            tmp_path / "local",
            progress=fractions.append,
        )
    assert (tmp_path / "shared" / "progress-test").is_dir() and not (tmp_path / "local").exists()
    lines = [r.getMessage() for r in caplog.records if r.name == "ssr_tasks.ray_grid"]
    assert any(line.startswith("trial lr_dni=0.1: ") for line in lines) and any("lr_dni=0.2" in line for line in lines)
    assert fractions and abs(fractions[-1] - 1.0) < 1e-9


def test_trial_line():
    assert (
        trial_line("lr_dni=0.1", {"progress": 0.5, "steps": 2, "val_acc": 0.61234, "time_total_s": 3.0})
        == "trial lr_dni=0.1: 50% steps=2 val_acc=0.6123"
    )
    assert trial_line("hidden=8,k=5", {"iteration": 3}) == "trial hidden=8,k=5: iteration=3"


def test_point_label():
    assert point_label({"lr_dni": 0.1}) == "lr_dni=0.1"
    assert point_label({"lr_dni": 1e-4, "hidden": 256}) == "hidden=256,lr_dni=0.0001"
    assert point_label({}) == "base"
