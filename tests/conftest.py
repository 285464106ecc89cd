"""Session-wide test services: one local Ray instance, one Prefect test harness, one run folder.

Both services are real (a local Ray bound to 127.0.0.1 and Prefect's SQLite-backed test
server); they take seconds to start, so the whole pytest session shares them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _mlflow_process_state() -> tuple:
    """MLflow's process-wide URIs: the environment and, once MLflow is imported, its globals."""
    env = tuple(os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))
    if "mlflow" not in sys.modules:
        return env, None
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return env, (tracking_utils._tracking_uri, registry_utils._registry_uri)


@pytest.fixture(autouse=True)
def _mlflow_uris_not_leaked():
    """The product never leaves MLflow URIs behind (``mlflow.set_tracking_uri`` writes
    MLFLOW_TRACKING_URI into os.environ, so a Tracker that called it would point every later
    pipeline of the process at its store): a test whose code changed them fails, and they
    are put back so later tests still start clean. Tests set URIs with monkeypatch only."""
    before = _mlflow_process_state()
    yield
    after = _mlflow_process_state()
    env_before, globals_before = before
    for key, value in zip(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"), env_before):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    leaked = (
        after[0] != env_before
        or (globals_before is not None and after[1] != globals_before)
        or (globals_before is None and after[1] not in (None, (None, None)))
    )
    if leaked:
        pytest.fail(f"MLflow process-wide URIs changed by the test: {before} -> {after}", pytrace=False)


@pytest.fixture(scope="session")
def ssr_home():
    """A run folder for the session (SSR_HOME), removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="ssr-test-home-"))
    old = os.environ.get("SSR_HOME")
    os.environ["SSR_HOME"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield path
    if old is None:
        os.environ.pop("SSR_HOME", None)
    else:
        os.environ["SSR_HOME"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session."""
    import ray

    from ssr_tasks.services import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2, object_store_mb=256)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary SQLite-backed API server), shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def glyphs_small(ssr_home):
    """The small built-in dataset, rendered once per session under the session's run folder."""
    from storage.glyphs import prepare_glyphs

    return prepare_glyphs(ssr_home / "data", seed=0, size="small")


def make_features(path, n_classes=(12, 6, 6), per_class=20, dim=16, seed=0, noise=0.9):
    """A features table of Gaussian clusters: split train/val/test with disjoint classes."""
    from storage.features import write_features

    rng = np.random.default_rng(seed)
    embs, labels, splits, paths = [], [], [], []
    for split, n in zip(("train", "val", "test"), n_classes):
        for c in range(n):
            centre = rng.normal(size=dim)
            embs.append(centre + noise * rng.normal(size=(per_class, dim)))
            labels += [f"{split}-c{c}"] * per_class
            splits += [split] * per_class
            paths += [f"{split}-c{c}/{i}.png" for i in range(per_class)]
    emb = np.concatenate(embs).astype(np.float32)
    write_features(
        path,
        ids=np.arange(len(emb)),
        labels=labels,
        splits=splits,
        embeddings=emb,
        paths=paths,
        metadata={"dataset": "synthetic", "backbone": "none", "checkpoint_hash": "-", "dim": str(dim)},
    )
    return path


@pytest.fixture(scope="session")
def synthetic_features(tmp_path_factory):
    """Features of 12 train, 6 val and 6 test classes of 20 rows each, D=16 (tests/tasks, tests/integration)."""
    return make_features(tmp_path_factory.mktemp("features") / "features.parquet")
