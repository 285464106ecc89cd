"""The authors' released models through the few-shot tasks: ``netSSRBest.pth`` evaluated
without training, a SIB backbone followed by training, and their bad inputs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flows.cli import main as ssr_main
from ssr_model import FewShotSSR
from ssr_model.backbones import build_backbone
from ssr_tasks.backbone import get_backbone, spec_name
from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot import tasks
from ssr_tasks.fewshot.episodes import load_split, sample_episodes
from ssr_tasks.fewshot.handoffs import KReciprocal
from storage.checkpoints import save_checkpoint
from storage.fewshot import DATASET_SPECS, list_split, load_images
from tests.tasks.conftest import grouped

SMALL = dict(
    data=dict(dataset="cifar-fs"),
    backbone=dict(name="conv4-64"),
    train=dict(n_way=5, n_shot=1, n_query=3),
    sweep={"lr_dni": [1e-3]},
    evaluation=dict(eval_shots=[1], n_val_episodes=4, n_test_episodes=6, n_eval_actors=1),
    baselines=dict(krecip_k1=[3], krecip_k2=[2], krecip_lambda=[0.3]),
    device="cpu",
)


@pytest.fixture
def released_params(authors_cifar_fs):
    root, checkpoint, _, _ = authors_cifar_fs
    return FewShotParams(
        **grouped(SMALL, data={"data_root": str(root)}, backbone={"released_checkpoint": str(checkpoint)})
    )


def test_released_checkpoint_scores_equal_the_model_built_by_hand(
    task_env, ray_local, authors_cifar_fs, released_params, tmp_path
):
    root, checkpoint, net_state, ssr_state = authors_cifar_fs
    saved = torch.load(checkpoint, weights_only=True)  # the authors' key names (their networks.py and ssr.py)
    assert set(saved) == {"SSR", "netFeat", "nbStep"} and saved["nbStep"] == 2
    assert {"conv_blocks.0.layers.Conv.weight", "conv_blocks.3.layers.BatchNorm.running_var"} <= set(saved["netFeat"])
    assert {"scale_cls", "dni_support.layer1.1.weight", "dni_query.layer3.bias"} <= set(saved["SSR"])
    p, work = released_params, str(tmp_path)
    t, ev = p.train, p.evaluation
    data = tasks.prepare_data.fn(p.data, t.episode, str(tmp_path))
    assert data.val_episodes_json == str(root.resolve() / "val1000Episode_5_way_1_shot_3_query.json")
    released = tasks.released_model.fn(p.backbone, p.data.dataset, t.episode, work)
    assert (released.steps, released.hidden, released.backbone.name) == (2, 24, "conv4-64")
    features = tasks.extract_features.fn(data, released.backbone, work, p.device)
    val = tasks.validation_episodes.fn(ev.n_val_episodes, t.episode, t.seed, features, data, work)
    assert len(val.load()) == 4  # the authors' fixed episodes
    trials = tasks.released_trials.fn(p.first_train, features, val, released, ev.n_eval_actors, p.device)
    assert len(trials.trials) == 1 and trials.best.best_steps == 2 and trials.best.stages == ()
    assert trials.best.label == "released" and trials.best.config.hidden == 24 and trials.best.config.lr_dni == 1e-3
    result = tasks.evaluate.fn(ev, t.episode, t.seed, features, trials.best.model, KReciprocal(3, 2, 0.3), 1, p.device)

    # by hand: the checkpoint's conv4 on the test images, its SSR on the same episodes
    net = build_backbone("conv4-64", 32)
    net.load_state_dict(net_state)
    index = list_split(root, "test")
    with torch.no_grad():
        feats = net.eval()(torch.from_numpy(load_images(index, index.paths, DATASET_SPECS["cifar-fs"])))
    model = FewShotSSR(256, 5, 15, steps=2, lr_dni=1e-3, hidden=24)
    model.load_state_dict(ssr_state)
    test = load_split(features.path, "test")
    np.testing.assert_allclose(test.embeddings, feats.numpy(), rtol=1e-5, atol=1e-5)
    eps = sample_episodes(test, 6, 5, 1, 3, seed=20_000 + t.seed + 1)
    support, query = feats[torch.from_numpy(eps.support)], feats[torch.from_numpy(eps.query)].reshape(6, 15, -1)
    labels = torch.arange(5).repeat_interleave(3)
    scores = model.eval()(support, query)
    protos = F.normalize(support.mean(2), dim=-1)
    baseline = F.normalize(query, dim=-1) @ protos.transpose(1, 2)
    np.testing.assert_allclose(
        result.ssr_by_step[-1], (scores.argmax(-1) == labels).float().mean(-1).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(result.baseline, (baseline.argmax(-1) == labels).float().mean(-1).numpy(), atol=1e-6)
    assert len(result.ssr_by_step) == 3  # before refining, after step 1, after step 2


def test_sib_backbone_then_online_training(task_env, ray_local, authors_cifar_fs, tmp_path):
    root, _, net_state, _ = authors_cifar_fs
    released = root.parent / "backbones" / "CIFAR-FS" / "Conv4_64_Cos_netFeatBest.pth"
    save_checkpoint(released, net_state)  # where `ssr data download fewshot-backbones` puts it
    p = FewShotParams(
        **grouped(
            SMALL,
            data={"data_root": str(root)},
            backbone={"checkpoint": "released"},
            train={
                "train_augment": "online",
                "hidden": 8,
                "max_steps": 2,
                "iterations_first": 2,
                "iterations_next": 1,
                "val_every": 1,
                "batch_episodes": 1,
            },
        )
    )
    t, work = p.train, str(tmp_path)
    data = tasks.prepare_data.fn(p.data, t.episode, work)
    backbone = get_backbone.fn(
        p.backbone, spec_name(p.data.dataset), t.seed, data.root, str(tmp_path / "backbones"), p.device
    )
    assert backbone.path == str(released.resolve())
    features = tasks.extract_features.fn(data, backbone, work, p.device)
    val = tasks.validation_episodes.fn(p.evaluation.n_val_episodes, t.episode, t.seed, features, data, work)
    training = tasks.training_features.fn(t.train_augment, t.seed, data, backbone, work, p.device)
    assert training.mode == "online" and training.views_path is None
    trials = tasks.train_ssr.fn(t, p.sweep, features, val, work, training, device=p.device)
    assert [s.steps for s in trials.best.stages] == [1, 2]
    assert [h.iteration for h in trials.best.stages[0].history] == [1, 2]


def _run(argv, capsys):
    code = ssr_main(["run", "fewshot", *argv])
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_in_one_line_and_write_nothing(authors_cifar_fs, tmp_path, capsys, monkeypatch):
    root, checkpoint, net_state, ssr_state = authors_cifar_fs
    monkeypatch.setenv("SSR_HOME", str(tmp_path / "home"))
    base = ["--set", "data.dataset=cifar-fs", "--set", "train.n_query=3"]

    code, err = _run([*base, "--set", f"data.data_root={tmp_path / 'empty'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "empty/train: split folder not found" in err

    bad = tmp_path / "episodes.json"
    text = (root / "val1000Episode_5_way_1_shot_3_query.json").read_text()
    first = text.split('"Query": [["')[1].split('"')[0]
    bad.write_text(text.replace(first, first.replace(".jpg", "_missing.jpg"), 1))
    code, err = _run([*base, "--set", f"data.data_root={root}", "--set", f"data.val_episodes_json={bad}"], capsys)
    assert (
        code == 2 and err.count("\n") == 1 and "episodes.json: episode 0: Query image" in err and "_missing.jpg" in err
    )

    wrong = [*base, "--set", f"data.data_root={root}", "--set", f"backbone.released_checkpoint={checkpoint}"]
    code, err = _run([*wrong, "--set", "backbone.name=resnet12"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "netSSRBest.pth (netFeat): not a resnet12 state dict for cifar-fs" in err and "set backbone=conv4-64" in err

    garbage = tmp_path / "netSSRBest.pth"
    torch.save({"netFeat": {"features.0.weight": torch.ones(3)}, "SSR": ssr_state, "nbStep": 2}, garbage)
    code, err = _run(
        [*base, "--set", f"data.data_root={root}", "--set", f"backbone.released_checkpoint={garbage}"], capsys
    )
    assert code == 2 and "keys fit none of conv4-64, resnet12, wrn-28-10 for cifar-fs images" in err

    torch.save({"netFeat": net_state, "SSR": ssr_state, "nbStep": 2}, garbage)
    code, err = _run(
        [
            *base,
            "--set",
            f"data.data_root={root}",
            "--set",
            f"backbone.released_checkpoint={garbage}",
            "--set",
            "train.n_query=15",
        ],
        capsys,
    )
    assert code == 2 and "SSR's DNI takes" in err and "n_query=15 per class" in err
    assert not (tmp_path / "home").exists()
