"""``run_grid`` sweeps any field of a training config, not only lr_dni: each trial receives the
config object itself with its point applied, and its folder is named after the point."""

from __future__ import annotations

import re

from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.ray_grid import SUMMARY, point_label, run_grid, trial_dir


def make_recording_trial():
    """A trainable that reports what it received (made inside a function: Ray ships it by value)."""

    def record(trial):
        from ssr_tasks.config import RetrievalTrainParams

        cfg = trial.config
        seen = {
            "is_params": isinstance(cfg, RetrievalTrainParams),
            "k": cfg.k,
            "k_is_int": type(cfg.k) is int,
            "hidden": cfg.hidden,
            "lr": cfg.lr,
            "label": trial.label,
            "point": dict(trial.point),
            "inputs": trial.inputs,
            "device": trial.device,
        }
        trial.workspace.report({"iteration": 1, "progress": 0.5})
        return seen, {"best_val_map": 0.0}

    return record


def test_run_grid_sweeps_a_non_lr_field_and_trials_get_the_config(ray_local, tmp_path):
    base = RetrievalTrainParams(k=50, hidden=256, lr=0.05)
    ckpt_root = tmp_path / "trials"
    results = run_grid(
        make_recording_trial(),
        base,
        {"k": [7, 5], "hidden": [8]},
        name="sweep-k",
        inputs="features.parquet",
        ckpt_root=ckpt_root,
        storage_path=tmp_path / "ray",
    )

    # the sweep's order (k as given: 7 then 5), not sorted and not Tune's completion order
    assert [r.point for r in results] == [{"hidden": 8, "k": 7}, {"hidden": 8, "k": 5}]
    assert [r.label for r in results] == ["hidden=8,k=7", "hidden=8,k=5"]
    for r, k in zip(results, (7, 5)):
        seen = r.summary  # what the trial itself received, on a Ray worker
        assert seen["is_params"] and seen["k_is_int"] and (seen["k"], seen["hidden"]) == (k, 8)
        assert seen["lr"] == 0.05  # the base's other fields are kept
        assert seen["label"] == r.label and seen["point"] == {"hidden": 8, "k": k}
        assert (seen["inputs"], seen["device"]) == ("features.parquet", "cpu")
        # on the driver as well: the config object, the point applied and validated
        assert isinstance(r.config, RetrievalTrainParams) and r.config == base.model_copy(update={"hidden": 8, "k": k})
        assert type(r.config.k) is int

    folders = [r.folder for r in results]
    assert folders == [trial_dir(ckpt_root, r.point) for r in results] and folders[0] != folders[1]
    for folder, label in zip(folders, ("hidden=8,k=7", "hidden=8,k=5")):
        assert folder.parent == ckpt_root and (folder / SUMMARY).exists()
        assert re.fullmatch(re.escape(label) + r"-[0-9a-f]{8}", folder.name), folder.name
    assert point_label({"k": 5, "hidden": 8}) == "hidden=8,k=5"  # fields in sorted order, whatever the dict's
