"""Fixtures of the task tests: small synthetic inputs, and Prefect's run logger and progress
artifacts switched off so that a task's ``.fn`` runs without a Prefect server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ssr_tasks.config import FewShotParams, RetrievalParams

# The smallest settings of each pipeline that still run every step.
TINY_FEWSHOT = dict(
    backbone=dict(pretrain_epochs=1, pretrain_batch_size=8),
    train=dict(
        n_way=3,
        n_shot=1,
        n_query=4,
        max_steps=2,
        hidden=16,
        iterations_first=4,
        iterations_next=2,
        val_every=2,
        batch_episodes=2,
    ),
    sweep={"lr_dni": [0.1]},
    evaluation=dict(eval_shots=[1, 2], n_val_episodes=6, n_test_episodes=8, n_eval_actors=1),
    baselines=dict(krecip_k1=[3], krecip_k2=[2], krecip_lambda=[0.3, 0.5]),
    device="cpu",
)
TINY_RETRIEVAL = dict(
    data=dict(glyphs_size="small", holdout_fraction=0.3),
    backbone=dict(pretrain_epochs=1),
    train=dict(
        k=10,
        hidden=16,
        sequence_length=60,
        min_positives=0,
        iterations=4,
        val_every=2,
        batch_queries=4,
        n_val_queries=10,
    ),
    sweep={"lr_dni": [1e-3]},
    baselines=dict(qe_n_grid=[1, 3], krecip_pairs=[(10, 5)], krecip_lambda=[0.3]),
    evaluation=dict(shard_size=16, n_rerank_actors=1),
    device="cpu",
)


def grouped(base: dict, **groups) -> dict:
    """``base`` (grouped parameters) with fields of some groups replaced, the others kept:
    ``grouped(TINY_FEWSHOT, train={"hidden": 8}, device="cpu")``. A dict value updates the
    group field by field (``sweep`` too); any other value replaces the key."""
    out = dict(base)
    for key, value in groups.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


class NoProgress:
    """Stands in for ``ssr_tasks.taskkit.Progress`` (no Prefect artifact); records the updates."""

    calls: list = []

    def __init__(self, key: str, description: str):
        self.key = key

    def __call__(self, done: float, total: float = 1.0, *_):
        NoProgress.calls.append((self.key, done, total))


@pytest.fixture
def task_env(monkeypatch):
    """Run Prefect tasks' ``.fn`` outside a flow: no run logger, no progress artifacts."""
    from prefect.logging import disable_run_logger

    import ssr_tasks.backbone
    import ssr_tasks.fewshot.tasks
    import ssr_tasks.retrieval.tasks

    for module in (ssr_tasks.backbone, ssr_tasks.fewshot.tasks, ssr_tasks.retrieval.tasks):
        monkeypatch.setattr(module, "Progress", NoProgress)
    with disable_run_logger():
        yield


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, request):
    """A work folder shared by the tests of one module (each step builds on the previous one's outputs)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="session")
def tiny_image_dataset(tmp_path_factory):
    """A CIFAR-FS-layout folder: 4 train, 3 val, 3 test classes of 8 random 32x32 RGB images."""
    root = tmp_path_factory.mktemp("tiny-cifar-fs")
    rng = np.random.default_rng(0)
    for split, n_classes in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(n_classes):
            folder = root / split / f"{split}{c}"
            folder.mkdir(parents=True)
            base = rng.integers(0, 256, size=(32, 32, 3))
            for i in range(8):
                img = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_fewshot_params(tiny_image_dataset):
    return FewShotParams(**grouped(TINY_FEWSHOT, data={"dataset": "cifar-fs", "data_root": str(tiny_image_dataset)}))


@pytest.fixture(scope="session")
def tiny_retrieval_params():
    return RetrievalParams(**TINY_RETRIEVAL)


@pytest.fixture(scope="session")
def authors_cifar_fs(tmp_path_factory):
    """CIFAR-FS from authors'-format pickles, its fixed episodes and a ``netSSRBest.pth``
    (``tests.authors_formats.build_authors_cifar_fs``)."""
    from tests.authors_formats import build_authors_cifar_fs

    return build_authors_cifar_fs(tmp_path_factory.mktemp("authors-cifar-fs"))
