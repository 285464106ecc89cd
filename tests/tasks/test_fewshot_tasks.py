"""Every few-shot Prefect task's ``.fn`` on a tiny image folder and small features, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssr_tasks.backbone import get_backbone
from ssr_tasks.fewshot import report, tasks
from ssr_tasks.fewshot.handoffs import FewShotData, KReciprocal, ShotResult
from ssr_tasks.handoffs import Backbone, Features, Trials
from storage.fewshot import data_identity


@pytest.fixture
def data(task_env, tiny_fewshot_params, tiny_image_dataset, pipeline_dir):
    return tasks.prepare_data.fn(tiny_fewshot_params, str(pipeline_dir))


@pytest.fixture
def backbone(data, tiny_fewshot_params, pipeline_dir):
    return get_backbone.fn(tiny_fewshot_params, data.root, str(pipeline_dir / "backbones"))


@pytest.fixture
def features(data, backbone, tiny_fewshot_params, pipeline_dir):
    return tasks.extract_features.fn(tiny_fewshot_params, data, backbone, str(pipeline_dir))


@pytest.fixture
def val(features, data, tiny_fewshot_params, pipeline_dir):
    return tasks.validation_episodes.fn(tiny_fewshot_params, features, data, str(pipeline_dir))


def test_prepare_data_checks_a_real_dataset_root(data, tiny_image_dataset):
    assert data == FewShotData(str(tiny_image_dataset.resolve()), None)


def test_get_backbone_pretrains_once_then_reuses(backbone, data, tiny_fewshot_params, pipeline_dir):
    assert isinstance(backbone, Backbone) and (backbone.name, backbone.spec) == ("conv4-64", "cifar-fs")
    stamp = pipeline_dir.joinpath("backbones").glob("*.pt").__next__().stat().st_mtime_ns
    again = get_backbone.fn(tiny_fewshot_params, data.root, str(pipeline_dir / "backbones"))
    assert again == backbone and next((pipeline_dir / "backbones").glob("*.pt")).stat().st_mtime_ns == stamp
    released = get_backbone.fn(tiny_fewshot_params.model_copy(update={"backbone_checkpoint": backbone.path}), data.root, "unused")
    assert released == backbone


def test_extract_features_reads_the_width_from_the_table(features):
    assert isinstance(features, Features) and features.dim == 256  # conv4-64 on 32x32 images: 64 x 2 x 2


def test_validation_episodes_are_seeded_index_arrays(val, tiny_fewshot_params):
    eps = val.load()
    p = tiny_fewshot_params
    assert eps.support.shape == (p.n_val_episodes, p.n_way, p.n_shot_train) and eps.query.shape == (p.n_val_episodes, p.n_way, p.n_query)


def test_validation_episodes_follow_the_fixed_json(task_env, synthetic_features, tmp_path, tiny_fewshot_params):
    episode = {"Support": [["val-c0/0.png"], ["val-c1/0.png"], ["val-c2/0.png"]],
               "Query": [["val-c0/1.png"], ["val-c1/1.png"], ["val-c2/1.png"]]}
    (tmp_path / "eps.json").write_text(json.dumps([episode, episode]))
    data = FewShotData(str(tmp_path), str(tmp_path / "eps.json"))
    out = tasks.validation_episodes.fn(tiny_fewshot_params, Features(str(synthetic_features), 16), data, str(tmp_path))
    assert len(out.load()) == 2


def test_train_choose_evaluate_and_report(val, features, tiny_fewshot_params, pipeline_dir, ray_local):
    p = tiny_fewshot_params
    trials = tasks.train_ssr.fn(p, features, val, str(pipeline_dir))
    assert isinstance(trials, Trials) and [t.lr_dni for t in trials.trials] == p.lr_dni_grid
    best = trials.best
    assert [s.steps for s in best.stages] == [1, 2] and best.best_val == max(s.best_val for s in best.stages)
    assert best.model.config.n_query == p.n_query and best.model.steps == best.best_steps
    model = best.model.build()
    assert model.n_query == p.n_way * p.n_query  # the one place: TrainConfig.build

    krecip = tasks.choose_krecip.fn(p, features, val)
    assert isinstance(krecip, KReciprocal) and krecip.k1 == 3 and krecip.lam in p.krecip_lambda

    shots = [tasks.evaluate.fn(p, features, best.model, krecip, shot) for shot in p.eval_shots]
    for res in shots:
        assert isinstance(res, ShotResult) and len(res.baseline) == len(res.krecip) == p.n_test_episodes
        assert len(res.ssr_by_step) == best.best_steps + 1
        assert all(0.0 <= a <= 1.0 for a in res.baseline)

        assert [name for name, _ in res.peers] == [m for m in p.methods if m not in ("baseline", "k-reciprocal", "ssr")]
        assert {c.key for c in res.cost} == {"baseline", "krecip", "ssr", "simpleshot", "bd_cspn", "tim", "pt_map",
                                             "laplacianshot"} and all(c.ms_per_episode > 0 for c in res.cost)

    out = report.write_report.fn(p, trials, krecip, shots, str(pipeline_dir / "results"))
    assert [r["method"][:3] for r in out.rows] == ["Bas", "k-r", "SSR", "Sim", "BD-", "TIM", "PT-", "Lap"]
    assert set(out.rows[0]) == {"method", "queries"} | {f"{s}-shot {what}" for s in (1, 2)
                                                        for what in ("acc (%)", "ms/episode", "peak MiB/episode")}
    assert "| method |" in out.markdown and {name for name, _ in out.figures} == {"accuracy_by_step.png", "training_curves.png",
                                                                                  "accuracy_vs_cost.png"}
    for _, path in out.figures:
        assert open(path, "rb").read(4) == b"\x89PNG"


def test_shot_result_names_methods_as_the_metrics_do():
    res = ShotResult(1, (1.0, 0.0), (0.5, 0.5), ((0.2, 0.4), (0.6, 0.8)))
    acc = res.accuracies()
    assert list(acc) == ["baseline", "krecip", "ssr_step0", "ssr_step1"]
    np.testing.assert_allclose(acc["ssr_step1"], [0.6, 0.8])
    assert KReciprocal(20, 6, 0.3).label == "k1=20, k2=6, λ=0.3"


def test_train_config_carries_every_parameter(tiny_fewshot_params):
    cfg = tasks.train_config(tiny_fewshot_params, 32)
    assert (cfg.feat_dim, cfg.n_way, cfg.n_query, cfg.hidden, cfg.max_steps) == (32, 3, 4, 16, 2)
    assert cfg.build(2).n_query == 12 and torch.is_tensor(next(cfg.build(1).parameters()))


def test_a_rendering_with_other_settings_in_the_same_folder_gets_new_features(features, data, backbone,
                                                                              tiny_fewshot_params, pipeline_dir):
    """The built-in glyphs re-render in place (same path) for another seed or size; its
    ``dataset.json`` tells the renderings apart, so features are not reused across them."""
    manifest = Path(data.root) / "dataset.json"
    manifest.write_text(json.dumps({"name": "glyphs", "seed": 1, "size": "small"}))
    try:
        other = tasks.extract_features.fn(tiny_fewshot_params, data, backbone, str(pipeline_dir))
        assert other.path != features.path
        again = tasks.extract_features.fn(tiny_fewshot_params, data, backbone, str(pipeline_dir))
        assert again.path == other.path  # the same rendering: reused
    finally:
        manifest.unlink()
    assert data_identity(data.root) == str(Path(data.root).resolve())  # a folder without a manifest: its path
