"""Distractors in the retrieval data group: which data set takes which field, and the
published-features path (a revisitop-style (D, N) file appended to the joined test table)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ssr_tasks.config import RetrievalDataParams
from ssr_tasks.retrieval.distractors import feature_distractors
from storage.errors import StorageError
from storage.features import read_features, write_features

META = {"dataset": "roxford5k", "backbone": "gl18_resnet101", "checkpoint_hash": "-"}


def test_each_dataset_takes_its_kind_of_distractors(tmp_path):
    assert RetrievalDataParams(distractors=200).distractors == 200
    with pytest.raises(ValidationError, match=r"distractors_path: the glyphs render their distractors"):
        RetrievalDataParams(distractors_path=str(tmp_path / "r1m.npy"))
    with pytest.raises(ValidationError, match=r"distractors: rendered distractors are for the glyphs; for roxford5k"):
        RetrievalDataParams(dataset="roxford5k", data_root=str(tmp_path), distractors=10)
    with pytest.raises(ValidationError, match=r"greater than or equal to 0"):
        RetrievalDataParams(distractors=-1)
    assert RetrievalDataParams(dataset="roxford5k", data_root=str(tmp_path), distractors_path="x.npy").distractors == 0


def test_published_distractors_follow_the_test_database(tmp_path):
    rng = np.random.default_rng(0)
    N, Q, D, X = 6, 2, 4, 9
    test = write_features(
        tmp_path / "retrieval-features-abc.parquet",
        ids=np.arange(N + Q),
        labels=["db"] * N + ["query"] * Q,
        splits=["database"] * N + ["query"] * Q,
        embeddings=rng.normal(size=(N + Q, D)).astype(np.float32),
        metadata=META,
    )
    distractors = rng.normal(size=(X, D)).astype(np.float32)
    source = tmp_path / "r1m.npy"
    np.save(source, distractors.T)  # revisitop stores features (D, N)

    out, n = feature_distractors(test, str(source))
    assert n == X and out.name.startswith("retrieval-features-abc-distractors-")
    db = read_features(out, split="database")
    np.testing.assert_array_equal(db.embeddings[:N], read_features(test, split="database").embeddings)
    np.testing.assert_allclose(db.embeddings[N:], distractors)  # in file order, after the ground truth's N
    assert db.ids[N:].tolist() == list(range(N + Q, N + Q + X)) and set(db.labels[N:]) == {"distractor"}
    assert read_features(out, split="query").ids.tolist() == [N, N + 1]
    before = out.stat().st_mtime_ns
    assert feature_distractors(test, str(source)) == (out, X) and out.stat().st_mtime_ns == before  # built once

    with pytest.raises(StorageError, match=r"missing.npy: data.distractors_path: distractor features not found"):
        feature_distractors(test, str(tmp_path / "missing.npy"))
