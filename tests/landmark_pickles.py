"""Small synthetic data in the authors' landmark pickle formats (tests of the real-data path).

``gl18_resnet101_<test set>.pkl``: ``database`` (D, N) and ``query`` (D, Q) float32 with
L2-normalised columns, ``gt``: one dict per query with ``easy``, ``hard``, ``junk`` (int
arrays of database indices) and ``bbx``. ``gl18_resnet101_sfm120k.pkl``: ``database``
(D, N) and ``cluster`` (N,). Landmarks are Gaussian clusters: easy images lie close to the
landmark's centre, hard ones further, junk far; distractors are random.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _unit_columns(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=0, keepdims=True)).astype(np.float32)


def write_test_pickle(
    root: Path,
    name: str = "roxford5k",
    dim: int = 32,
    n_landmarks: int = 5,
    per_landmark: int = 12,
    n_distractors: int = 60,
    queries_per_landmark: int = 2,
    seed: int = 0,
) -> dict:
    """Write ``<root>/gl18_resnet101_<name>.pkl``; returns the pickled dict."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_landmarks, dim))
    cols, kinds, owner = [], [], []
    for lm in range(n_landmarks):
        for i in range(per_landmark):
            kind = ("easy", "hard", "junk")[i % 3]
            spread = {"easy": 0.5, "hard": 1.0, "junk": 2.5}[kind]
            cols.append(centres[lm] + spread * rng.normal(size=dim))
            kinds.append(kind)
            owner.append(lm)
    cols += list(rng.normal(size=(n_distractors, dim)) * 1.5)
    kinds += ["distractor"] * n_distractors
    owner += [-1] * n_distractors
    order = rng.permutation(len(cols))  # landmark images spread through the database
    database = _unit_columns(np.stack([cols[i] for i in order], axis=1))
    kinds, owner = [kinds[i] for i in order], np.asarray([owner[i] for i in order])
    queries, gt = [], []
    for lm in range(n_landmarks):
        for _ in range(queries_per_landmark):
            queries.append(centres[lm] + 0.6 * rng.normal(size=dim))
            mine = [j for j in range(len(kinds)) if owner[j] == lm]
            gt.append(
                {
                    key: np.array([j for j in mine if kinds[j] == key], dtype=np.int64)
                    for key in ("easy", "hard", "junk")
                }
                | {"bbx": np.array([0.0, 0.0, 10.0 + lm, 12.0])}
            )
    obj = {"database": database, "query": _unit_columns(np.stack(queries, axis=1)), "gt": gt}
    (Path(root) / f"gl18_resnet101_{name}.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    return obj


def write_sfm_pickle(root: Path, dim: int = 32, n_clusters: int = 60, per_cluster: int = 12, seed: int = 1) -> dict:
    """Write ``<root>/gl18_resnet101_sfm120k.pkl`` (clusters of ``per_cluster`` images); returns the dict."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = np.repeat(centres, per_cluster, axis=0) + 1.2 * rng.normal(size=(n_clusters * per_cluster, dim))
    obj = {"database": _unit_columns(x.T), "cluster": np.repeat(np.arange(n_clusters), per_cluster).astype(np.int32)}
    (Path(root) / "gl18_resnet101_sfm120k.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    return obj
