"""Training-episode features (``train_augment``): the features table, N views extracted once,
and online augmentation through the frozen backbone; each a pure function of (episodes, iteration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_model.backbones import build_backbone
from ssr_tasks.config import FewShotTrainParams
from ssr_tasks.fewshot.episodes import load_split, sample_episodes
from ssr_tasks.fewshot.train import train_curriculum
from ssr_tasks.fewshot.train_features import OnlineFeatures, TrainAugment, ViewFeatures, extract_views, training_source
from storage.features import write_features
from storage.fewshot import DATASET_SPECS, list_split, load_images

META = {"dataset": "cifar-fs", "backbone": "conv4-64", "checkpoint_hash": "-"}


@pytest.fixture(scope="module")
def setup(authors_cifar_fs, tmp_path_factory):
    root, _, net_state, _ = authors_cifar_fs
    net = build_backbone("conv4-64", 32)
    net.load_state_dict(net_state)
    net.eval()
    out = tmp_path_factory.mktemp("train-features")
    index = list_split(root, "train")
    with torch.no_grad():
        emb = net(torch.from_numpy(load_images(index, index.paths, DATASET_SPECS["cifar-fs"]))).numpy()
    table = write_features(
        out / "features.parquet",
        ids=np.arange(len(emb)),
        labels=[index.classes[c] for c in index.labels],
        splits="train",
        embeddings=emb,
        paths=index.paths,
        metadata=META,
    )
    return root, net, load_split(table, "train"), out


def test_train_augment_is_parsed():
    assert TrainAugment.parse("none") == TrainAugment("none")
    assert TrainAugment.parse("online") == TrainAugment("online")
    assert TrainAugment.parse("views:12") == TrainAugment("views", 12)
    for bad in ("views:0", "views", "offline", "views:-2"):
        with pytest.raises(ValueError, match="train_augment: expected none, online or views:N"):
            TrainAugment.parse(bad)


def test_views_are_extracted_once_and_drawn_per_iteration(setup):
    root, net, train, out = setup
    path = extract_views(root, "cifar-fs", net, 3, out / "views.parquet", META, seed=1)
    stamp = path.stat().st_mtime_ns
    assert extract_views(root, "cifar-fs", net, 3, path, META, seed=1).stat().st_mtime_ns == stamp  # kept
    source = training_source(TrainAugment("views", 3), train, seed=1, views_path=str(path))
    assert isinstance(source, ViewFeatures) and source.views.shape == (3, len(train.labels), 256)
    assert not np.allclose(source.views[0], source.views[1]) and not np.allclose(source.views[0], train.embeddings)
    eps = sample_episodes(train, 2, 5, 1, 3, seed=0)
    s1, q1, labels = source.gather(eps, 7, "cpu")
    s2, q2, _ = source.gather(eps, 7, "cpu")
    assert s1.shape == (2, 5, 1, 256) and q1.shape == (2, 15, 256) and labels.shape == (2, 15)
    assert torch.equal(s1, s2) and torch.equal(q1, q2)
    rows = eps.query.reshape(2, 15)
    for e in range(2):
        for j in range(15):  # every query feature is one of the views of its image
            assert any(np.allclose(q1[e, j].numpy(), source.views[v, rows[e, j]]) for v in range(3))
    assert not torch.equal(source.gather(eps, 8, "cpu")[1], q1)


def test_online_features_are_augmented_images_through_the_frozen_backbone(setup):
    root, net, train, _ = setup
    source = training_source(TrainAugment("online"), train, seed=3, net=net, data_root=str(root), dataset="cifar-fs")
    assert isinstance(source, OnlineFeatures)
    eps = sample_episodes(train, 1, 5, 1, 3, seed=0)
    support, query, _ = source.gather(eps, 11, "cpu")
    rows = np.concatenate([eps.support.reshape(-1), eps.query.reshape(-1)])
    x = load_images(
        source.images, [train.paths[i] for i in rows], DATASET_SPECS["cifar-fs"], rng=np.random.default_rng([3, 11])
    )
    with torch.no_grad():
        want = net(torch.from_numpy(x))
    torch.testing.assert_close(support.reshape(5, -1), want[:5])
    torch.testing.assert_close(query.reshape(15, -1), want[5:])
    assert not net.training and not torch.allclose(query[0], torch.from_numpy(train.embeddings[eps.query[0, 0, 0]]))


def test_training_runs_on_views(setup, tmp_path):
    root, net, train, out = setup
    views = extract_views(root, "cifar-fs", net, 3, out / "views.parquet", META, seed=1)  # made once per module
    source = training_source(TrainAugment("views", 3), train, seed=0, views_path=str(views))
    val_eps = sample_episodes(train, 2, 5, 1, 3, seed=5)
    cfg = FewShotTrainParams(
        n_way=5, n_query=3, hidden=8, lr_dni=1e-3, max_steps=1, iterations_first=2, val_every=1, batch_episodes=1
    )  # on the 256-wide features of the table
    summary = train_curriculum(cfg, source, train, val_eps, tmp_path)
    assert summary["best_steps"] == 1 and len(summary["stages"][0]["history"]) == 2
