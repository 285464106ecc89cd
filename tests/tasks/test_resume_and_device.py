"""The shared infrastructure: the resume helper of the three training loops, and device selection."""

from __future__ import annotations

import pytest
import torch

from ssr_tasks.backbone import pretrain_backbone
from ssr_tasks.device import cluster_device, local_device, resolve_device
from ssr_tasks.resume import LoopState, TrainingCheckpoint, finished, mark_finished


def test_checkpoint_round_trip_restores_states_and_progress(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt = TrainingCheckpoint(tmp_path / "last.pt", net=net, optim=opt)
    assert ckpt.restore() is None
    ckpt.save(LoopState(done=7, best=0.5, history=[{"iteration": 7, "val": 0.5}]))

    other, other_opt = torch.nn.Linear(3, 2), None
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    state = TrainingCheckpoint(tmp_path / "last.pt", net=other, optim=other_opt).restore()
    assert state == LoopState(7, 0.5, [{"iteration": 7, "val": 0.5}])
    torch.testing.assert_close(other.weight, net.weight)
    assert other_opt.state_dict()["state"][0]["momentum_buffer"] is not None
    ckpt.remove()
    assert not (tmp_path / "last.pt").exists()


def test_a_checkpoint_of_other_objects_is_not_restored(tmp_path):
    net = torch.nn.Linear(3, 2)
    TrainingCheckpoint(tmp_path / "last.pt", net=net).save(LoopState(done=1))
    assert (
        TrainingCheckpoint(tmp_path / "last.pt", net=net, optim=torch.optim.SGD(net.parameters(), lr=1.0)).restore()
        is None
    )


def test_finished_marker(tmp_path):
    assert finished(tmp_path / "done.json") is None
    assert mark_finished(tmp_path / "done.json", {"best_val": 0.25}) == {"best_val": 0.25}
    assert finished(tmp_path / "done.json") == {"best_val": 0.25}


def test_interrupted_backbone_pretraining_resumes_to_the_same_weights(tmp_path, tiny_image_dataset):
    kw = dict(epochs=2, batch_size=16, lr=0.05, seed=1)
    clean = pretrain_backbone(tiny_image_dataset, "cifar-fs", "conv4-64", tmp_path / "clean.pt", **kw)

    def stop_after_first_epoch(epoch, epochs, loss, acc):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(
            tiny_image_dataset, "cifar-fs", "conv4-64", tmp_path / "resumed.pt", progress=stop_after_first_epoch, **kw
        )
    assert (tmp_path / "resumed.last.pt").exists() and not (tmp_path / "resumed.pt").exists()
    resumed = pretrain_backbone(tiny_image_dataset, "cifar-fs", "conv4-64", tmp_path / "resumed.pt", **kw)
    assert not (tmp_path / "resumed.last.pt").exists()
    a, b = torch.load(clean, weights_only=True), torch.load(resumed, weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_device_rule():
    assert resolve_device("auto", True, "x") == "cuda" and resolve_device("auto", False, "x") == "cpu"
    assert resolve_device("cpu", True, "x") == "cpu" and resolve_device("cuda", True, "x") == "cuda"
    with pytest.raises(ValueError, match="device: 'cuda' was asked for but the Ray cluster has no CUDA device"):
        resolve_device("cuda", False, "the Ray cluster")
    assert local_device("cpu") == "cpu"


def test_cluster_device_follows_the_cluster(ray_local):
    gpu = ray_local.cluster_resources().get("GPU", 0) >= 1
    assert cluster_device("auto") == ("cuda" if gpu else "cpu") and cluster_device("cpu") == "cpu"
