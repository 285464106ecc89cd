"""Every few-shot Prefect task's ``.fn`` on a tiny image folder and small features, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssr_tasks.backbone import get_backbone, spec_name
from ssr_tasks.fewshot import report, tasks
from ssr_tasks.fewshot.handoffs import FewShotData, KReciprocal, ShotResult
from ssr_tasks.handoffs import Backbone, Features, Trials
from storage.fewshot import data_identity


@pytest.fixture
def data(task_env, tiny_fewshot_params, tiny_image_dataset, pipeline_dir):
    p = tiny_fewshot_params
    return tasks.prepare_data.fn(p.data, p.train.episode, str(pipeline_dir))


@pytest.fixture
def backbone(data, tiny_fewshot_params, pipeline_dir):
    p = tiny_fewshot_params
    return get_backbone.fn(
        p.backbone, spec_name(p.data.dataset), p.train.seed, data.root, str(pipeline_dir / "backbones"), p.device
    )


@pytest.fixture
def features(data, backbone, tiny_fewshot_params, pipeline_dir):
    return tasks.extract_features.fn(data, backbone, str(pipeline_dir), "cpu")


@pytest.fixture
def val(features, data, tiny_fewshot_params, pipeline_dir):
    p = tiny_fewshot_params
    return tasks.validation_episodes.fn(
        p.evaluation.n_val_episodes, p.train.episode, p.train.seed, features, data, str(pipeline_dir)
    )


def test_prepare_data_checks_a_real_dataset_root(data, tiny_image_dataset):
    assert data == FewShotData(str(tiny_image_dataset.resolve()), None)


def test_get_backbone_pretrains_once_then_reuses(backbone, data, tiny_fewshot_params, pipeline_dir):
    assert isinstance(backbone, Backbone) and (backbone.name, backbone.spec) == ("conv4-64", "cifar-fs")
    stamp = pipeline_dir.joinpath("backbones").glob("*.pt").__next__().stat().st_mtime_ns
    p = tiny_fewshot_params
    again = get_backbone.fn(
        p.backbone, spec_name(p.data.dataset), p.train.seed, data.root, str(pipeline_dir / "backbones")
    )
    assert again == backbone and next((pipeline_dir / "backbones").glob("*.pt")).stat().st_mtime_ns == stamp
    given = p.backbone.model_copy(update={"checkpoint": backbone.path})
    released = get_backbone.fn(given, spec_name(p.data.dataset), p.train.seed, data.root, "unused")
    assert released == backbone


def test_extract_features_reads_the_width_from_the_table(features):
    assert isinstance(features, Features) and features.dim == 256  # conv4-64 on 32x32 images: 64 x 2 x 2


def test_validation_episodes_are_seeded_index_arrays(val, tiny_fewshot_params):
    eps = val.load()
    p = tiny_fewshot_params
    n, t = p.evaluation.n_val_episodes, p.train
    assert eps.support.shape == (n, t.n_way, t.n_shot) and eps.query.shape == (n, t.n_way, t.n_query)


def test_validation_episodes_follow_the_fixed_json(task_env, synthetic_features, tmp_path, tiny_fewshot_params):
    episode = {
        "Support": [["val-c0/0.png"], ["val-c1/0.png"], ["val-c2/0.png"]],
        "Query": [["val-c0/1.png"], ["val-c1/1.png"], ["val-c2/1.png"]],
    }
    (tmp_path / "eps.json").write_text(json.dumps([episode, episode]))
    data = FewShotData(str(tmp_path), str(tmp_path / "eps.json"))
    p = tiny_fewshot_params
    out = tasks.validation_episodes.fn(
        p.evaluation.n_val_episodes,
        p.train.episode,
        p.train.seed,
        Features(str(synthetic_features), 16),
        data,
        str(tmp_path),
    )
    assert len(out.load()) == 2


def test_train_choose_evaluate_and_report(val, features, tiny_fewshot_params, pipeline_dir, ray_local):
    p = tiny_fewshot_params
    t, ev = p.train, p.evaluation
    trials = tasks.train_ssr.fn(t, p.sweep, features, val, str(pipeline_dir), device=p.device)
    assert isinstance(trials, Trials) and [t.lr_dni for t in trials.trials] == p.sweep["lr_dni"]
    assert [trial.label for trial in trials.trials] == ["lr_dni=0.1"]
    best = trials.best
    assert [s.steps for s in best.stages] == [1, 2] and best.best_val == max(s.best_val for s in best.stages)
    assert best.model.config.n_query == t.n_query and best.model.steps == best.best_steps
    assert best.model.feat_dim == features.dim and best.config == t.model_copy(update={"lr_dni": 0.1})
    model = best.model.build()
    assert model.n_query == t.n_way * t.n_query  # the one place: FewShotTrainParams.build

    krecip = tasks.choose_krecip.fn(p.baselines, features, val, ev.n_eval_actors, p.device)
    assert isinstance(krecip, KReciprocal) and krecip.k1 == 3 and krecip.lam in p.baselines.krecip_lambda

    shots = [
        tasks.evaluate.fn(ev, t.episode, t.seed, features, best.model, krecip, shot, p.device) for shot in ev.eval_shots
    ]
    for res in shots:
        assert isinstance(res, ShotResult) and len(res.baseline) == len(res.krecip) == ev.n_test_episodes
        assert len(res.ssr_by_step) == best.best_steps + 1
        assert all(0.0 <= a <= 1.0 for a in res.baseline)

        assert [name for name, _ in res.peers] == [
            m for m in ev.methods if m not in ("baseline", "k-reciprocal", "ssr")
        ]
        assert {c.key for c in res.cost} == {
            "baseline",
            "krecip",
            "ssr",
            "simpleshot",
            "bd_cspn",
            "tim",
            "alpha_tim",
            "pt_map",
            "laplacianshot",
        } and all(c.ms_per_episode > 0 for c in res.cost)
        # one call on all 8 episodes (under EPISODES_PER_CALL): a peak measured for every method
        assert all(c.peak_mib_per_episode >= 0 for c in res.cost), res.cost

    out = report.write_report.fn(p, trials, krecip, shots, str(pipeline_dir / "results"))
    assert [r["method"][:3] for r in out.rows] == ["Bas", "k-r", "SSR", "Sim", "BD-", "TIM", "α-T", "PT-", "Lap"]
    assert set(out.rows[0]) == {"method", "queries"} | {
        f"{s}-shot {what}" for s in (1, 2) for what in ("acc (%)", "ms/episode", "peak MiB (E=8)")
    }
    assert all(
        r[f"{s}-shot peak MiB (E=8)"] == "< 1 MiB" or float(r[f"{s}-shot peak MiB (E=8)"].replace(",", "")) >= 1
        for r in out.rows
        for s in (1, 2)
    )
    assert "| method |" in out.markdown and {name for name, _ in out.figures} == {
        "accuracy_by_step.png",
        "training_curves.png",
        "accuracy_vs_cost.png",
    }
    for _, path in out.figures:
        assert open(path, "rb").read(4) == b"\x89PNG"


def test_shot_result_names_methods_as_the_metrics_do():
    res = ShotResult(1, (1.0, 0.0), (0.5, 0.5), ((0.2, 0.4), (0.6, 0.8)))
    acc = res.accuracies()
    assert list(acc) == ["baseline", "krecip", "ssr_step0", "ssr_step1"]
    np.testing.assert_allclose(acc["ssr_step1"], [0.6, 0.8])
    assert KReciprocal(20, 6, 0.3).label == "k1=20, k2=6, λ=0.3"


def test_the_train_group_builds_the_model(tiny_fewshot_params):
    cfg = tiny_fewshot_params.first_train  # the train group at the sweep's first point
    assert (cfg.n_way, cfg.n_query, cfg.hidden, cfg.max_steps, cfg.lr_dni) == (3, 4, 16, 2, 0.1)
    model = cfg.build(32, 2)
    assert (model.n_query, model.feat_dim, model.n_way) == (12, 32, 3)
    assert torch.is_tensor(next(cfg.build(32, 1).parameters()))


def test_a_rendering_with_other_settings_in_the_same_folder_gets_new_features(
    features, data, backbone, tiny_fewshot_params, pipeline_dir
):
    """The built-in glyphs re-render in place (same path) for another seed or size; its
    ``dataset.json`` tells the renderings apart, so features are not reused across them."""
    manifest = Path(data.root) / "dataset.json"
    manifest.write_text(json.dumps({"name": "glyphs", "seed": 1, "size": "small"}))
    try:
        other = tasks.extract_features.fn(data, backbone, str(pipeline_dir))
        assert other.path != features.path
        again = tasks.extract_features.fn(data, backbone, str(pipeline_dir))
        assert again.path == other.path  # the same rendering: reused
    finally:
        manifest.unlink()
    assert data_identity(data.root) == str(Path(data.root).resolve())  # a folder without a manifest: its path
