"""Few-shot training: episodes, curriculum, checkpoint resume equal to an undisturbed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssr_tasks.config import FewShotTrainParams
from ssr_tasks.fewshot.episodes import fixed_episodes, load_split, sample_episodes
from ssr_tasks.fewshot.train import train_curriculum


def small_cfg(**kw):
    """A tiny training config (the features' width, 16, is read from the table)."""
    base = dict(
        n_way=3,
        n_shot=1,
        n_query=4,
        hidden=16,
        lr_dni=1e-2,
        max_steps=2,
        iterations_first=8,
        iterations_next=4,
        batch_episodes=2,
        val_every=4,
        seed=3,
    )
    return FewShotTrainParams(**{**base, **kw})


def test_sample_episodes_is_seeded_and_disjoint(synthetic_features):
    val = load_split(synthetic_features, "val")
    a = sample_episodes(val, 5, 3, 2, 4, seed=1)
    b = sample_episodes(val, 5, 3, 2, 4, seed=1)
    assert np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    assert a.support.shape == (5, 3, 2) and a.query.shape == (5, 3, 4)
    for e in range(5):
        for w in range(3):
            rows = np.concatenate([a.support[e, w], a.query[e, w]])
            assert len(set(rows.tolist())) == 6
            assert len(set(val.labels[rows].tolist())) == 1


def test_sample_episodes_refuses_too_small_split(synthetic_features):
    val = load_split(synthetic_features, "val")
    with pytest.raises(ValueError, match="need n_way=7"):
        sample_episodes(val, 1, 7, 1, 4, seed=0)
    with pytest.raises(ValueError, match=r"n_shot 15 \+ n_query 10"):
        sample_episodes(val, 1, 3, 15, 10, seed=0)


def test_fixed_episodes_maps_paths_and_names_missing(tmp_path, synthetic_features):
    val = load_split(synthetic_features, "val")
    good = [{"Support": [["val-c0/0.png"], ["val-c1/0.png"]], "Query": [["val-c0/1.png"], ["val/val-c1/1.png"]]}] * 3
    (tmp_path / "eps.json").write_text(json.dumps(good))
    eps = fixed_episodes(val, tmp_path / "eps.json")
    assert eps.support.shape == (3, 2, 1) and eps.query.shape == (3, 2, 1) and eps.query_labels is None
    assert val.paths[eps.support[0, 1, 0]] == "val-c1/0.png" and val.paths[eps.query[0, 1, 0]] == "val-c1/1.png"
    assert len(fixed_episodes(val, tmp_path / "eps.json", limit=2)) == 2
    bad = [{"Support": [["val-c0/0.png"], ["nope/9.png"]], "Query": [["val-c0/1.png"], ["val-c1/1.png"]]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(
        ValueError,
        match=r"bad.json: episode 0: Support image 'nope/9.png' not found in .*"
        r"features.parquet, split 'val'",
    ):
        fixed_episodes(val, tmp_path / "bad.json")


def test_curriculum_trains_each_stage_from_previous_best(tmp_path, synthetic_features):
    train, val = load_split(synthetic_features, "train"), load_split(synthetic_features, "val")
    val_eps = sample_episodes(val, 6, 3, 1, 4, seed=5)
    summary = train_curriculum(small_cfg(), train, val, val_eps, tmp_path / "run")
    assert [s["steps"] for s in summary["stages"]] == [1, 2]
    assert summary["best_val"] == max(s["best_val"] for s in summary["stages"])
    state = torch.load(summary["best_path"], weights_only=True)
    assert set(state) >= {"scale_cls"} and any(k.startswith("dni_support.") for k in state)
    # finished stages keep their best weights only (no optimiser state to copy into Tune checkpoints)
    assert not list((tmp_path / "run").rglob("last.pt")) and len(list((tmp_path / "run").rglob("best.pt"))) == 2
    # a finished curriculum is reused as is
    again = train_curriculum(small_cfg(), train, val, val_eps, tmp_path / "run")
    assert again == summary


def test_interrupted_training_resumes_to_the_same_model(tmp_path, synthetic_features):
    train, val = load_split(synthetic_features, "train"), load_split(synthetic_features, "val")
    val_eps = sample_episodes(val, 6, 3, 1, 4, seed=5)
    cfg = small_cfg()
    clean = train_curriculum(cfg, train, val, val_eps, tmp_path / "clean")

    class Interrupt(Exception):
        pass

    def crash_once(row, state={"crashed": False}):  # noqa: B006 - the default is the state kept across calls
        if row["steps"] == 1 and row["iteration"] == 4 and not state["crashed"]:
            state["crashed"] = True
            raise Interrupt

    with pytest.raises(Interrupt):
        train_curriculum(cfg, train, val, val_eps, tmp_path / "resumed", report=crash_once)
    assert (tmp_path / "resumed" / "steps1" / "last.pt").exists()
    resumed = train_curriculum(cfg, train, val, val_eps, tmp_path / "resumed")
    assert resumed["best_val"] == pytest.approx(clean["best_val"])
    a = torch.load(clean["best_path"], weights_only=True)
    b = torch.load(resumed["best_path"], weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
