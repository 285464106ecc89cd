"""The authors' landmark pickles (their exact keys, (D, N) layout) as cached features tables,
the seeded-hash SfM-120k hold-out, the validation ground truth and the bad-input errors."""

import pickle

import numpy as np
import pytest

from storage.errors import DataValueError, SchemaError, StorageError
from storage.features import read_features
from storage.landmark_tables import (
    holdout_clusters,
    import_test_set,
    import_train_set,
    landmark_pickle,
    validation_ground_truth,
)
from storage.landmarks import read_gnd, read_gnd_json

D, N, Q = 8, 12, 3


def _test_pickle(root, name="roxford5k", seed=0, **override):
    rng = np.random.default_rng(seed)
    obj = {
        "database": rng.standard_normal((D, N)).astype(np.float32),  # (D, N) as published
        "query": rng.standard_normal((D, Q)).astype(np.float32),
        "gt": [
            {
                "easy": np.array([0, 1]),
                "hard": np.array([2]),
                "junk": np.array([3]),
                "bbx": np.array([1.0, 2.0, 9.0, 9.5]),
            },
            {
                "easy": np.array([4]),
                "hard": np.array([], np.int64),
                "junk": np.array([], np.int64),
                "bbx": np.array([0.0, 0.0, 5.0, 5.0]),
            },
            {
                "easy": np.array([], np.int64),
                "hard": np.array([5, 6]),
                "junk": np.array([11]),
                "bbx": np.array([3.0, 3.0, 4.0, 4.0]),
            },
        ],
    }
    obj.update(override)
    path = root / f"gl18_resnet101_{name}.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path, obj


def _sfm_pickle(root, n_clusters=40, per=3, dim=D, **override):
    rng = np.random.default_rng(5)
    obj = {
        "database": rng.standard_normal((dim, n_clusters * per)).astype(np.float32),
        "cluster": np.repeat(np.arange(n_clusters), per).astype(np.int32),
    }
    obj.update(override)
    path = root / "gl18_resnet101_sfm120k.pkl"
    path.write_bytes(pickle.dumps({k: v for k, v in obj.items() if v is not None}, protocol=4))
    return path, obj


def test_test_set_tables_and_cache(tmp_path):
    path, obj = _test_pickle(tmp_path)
    cache = tmp_path / "cache"
    ts = import_test_set(tmp_path, "roxford5k", cache)
    db, q = read_features(ts.database), read_features(ts.query)
    np.testing.assert_array_equal(db.embeddings, obj["database"].T)
    np.testing.assert_array_equal(q.embeddings, obj["query"].T)
    assert list(db.ids) == list(range(N)) and ts.dim == D and db.metadata["dataset"] == "roxford5k"
    gt = read_gnd_json(ts.gnd)
    assert [list(g["hard"]) for g in gt.gnd] == [[2], [], [5, 6]] and gt.gnd[0]["bbx"] == [1.0, 2.0, 9.0, 9.5]
    # imported once: a second call reuses the folder without writing
    stamp = ts.database.stat().st_mtime_ns
    again = import_test_set(tmp_path, "roxford5k", cache)
    assert again == ts and ts.database.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [ts.database.parent.name]
    # a changed pickle is imported anew
    _test_pickle(tmp_path, seed=1)
    assert import_test_set(tmp_path, "roxford5k", cache).database != ts.database


def test_holdout_is_a_seeded_hash_of_the_cluster():
    assert list(np.flatnonzero(holdout_clusters(np.arange(100), 0.05, 0))) == [3, 37, 52, 62, 74]
    assert list(np.flatnonzero(holdout_clusters(np.arange(100), 0.05, 1))) == [30, 65, 85, 93]
    # per cluster, whatever the order and multiplicity of the items; about the fraction asked
    clusters = np.random.default_rng(0).permutation(np.repeat(np.arange(2000), 3))
    held = holdout_clusters(clusters, 0.05, 0)
    assert all(len(set(held[clusters == c])) == 1 for c in range(50))
    assert 0.04 < held.mean() < 0.06
    np.testing.assert_array_equal(held[clusters == 37], True)
    with pytest.raises(ValueError, match=r"expected a value in \(0, 1\)"):
        holdout_clusters(clusters, 1.0, 0)


def test_train_set_split_by_holdout(tmp_path):
    _, obj = _sfm_pickle(tmp_path)
    ts = import_train_set(tmp_path, tmp_path / "cache", holdout_fraction=0.2, holdout_seed=3, expected_dim=D)
    t = read_features(ts.table)
    np.testing.assert_array_equal(t.embeddings, obj["database"].T)
    np.testing.assert_array_equal(t.labels, obj["cluster"])
    want = holdout_clusters(obj["cluster"], 0.2, 3)
    np.testing.assert_array_equal(t.splits == "val", want)
    assert (ts.n_val, ts.n_train) == (int(want.sum()), int((~want).sum())) and ts.n_val > 0
    # another hold-out is another cached table; the same one is reused
    other = import_train_set(tmp_path, tmp_path / "cache", holdout_fraction=0.2, holdout_seed=4)
    assert other.table != ts.table
    assert import_train_set(tmp_path, tmp_path / "cache", holdout_fraction=0.2, holdout_seed=3) == ts


def test_validation_ground_truth():
    clusters = np.array([7, 7, 7, 8, 9, 9])
    queries, database, gt = validation_ground_truth(clusters, 10, seed=0)
    # every cluster with two items gives queries, and keeps one item in the database
    assert set(clusters[queries]) == {7, 9} and sorted(np.r_[queries, database]) == list(range(6))
    assert 3 in database and {7, 9} <= set(clusters[database])
    assert gt.imlist == [str(i) for i in database] and gt.qimlist == [str(q) for q in queries]
    for q, g in zip(queries, gt.gnd):
        assert list(database[g["easy"]]) == [i for i in database if clusters[i] == clusters[q]]
        assert len(g["hard"]) == 0 and len(g["junk"]) == 0
    q2, _, _ = validation_ground_truth(clusters, 2, seed=0)
    assert len(q2) == 2
    again = validation_ground_truth(clusters, 2, seed=0)
    assert list(again[0]) == list(q2)
    with pytest.raises(DataValueError, match="none of the 3 held-out clusters has two images"):
        validation_ground_truth(np.array([1, 2, 3]), 5, 0)


def test_read_gnd_json_or_pickle(tmp_path):
    raw = {
        "imlist": [f"i{j}" for j in range(4)],
        "qimlist": ["q"],
        "gnd": [{"easy": [0], "hard": [3], "junk": [], "bbx": None}],
    }
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(raw))
    import json

    (tmp_path / "g.json").write_text(json.dumps(raw))
    assert list(read_gnd(tmp_path / "g.pkl", n_db=4).gnd[0]["hard"]) == [3]
    assert read_gnd(tmp_path / "g.json").qimlist == ["q"]
    with pytest.raises(DataValueError, match=r"g\.json: query 0: field 'hard' has index 3 outside \[0, 3\)"):
        read_gnd(tmp_path / "g.json", n_db=3)
    with pytest.raises(DataValueError, match=r"g\.pkl: imlist has 4 images, but the database has 5 rows"):
        read_gnd(tmp_path / "g.pkl", n_db=5)


def _nothing_left(cache):
    return not cache.exists() or not any(cache.iterdir())


def test_bad_inputs_one_line_nothing_partial(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"gl18_resnet101_rparis6k\.pkl: not found; data_root must hold"):
        landmark_pickle(tmp_path, "rparis6k")
    # SfM-120k without cluster labels
    _sfm_pickle(tmp_path, cluster=None)
    with pytest.raises(SchemaError, match=r"sfm120k\.pkl: missing key 'cluster'") as err:
        import_train_set(tmp_path, cache)
    assert "\n" not in str(err.value) and _nothing_left(cache)
    # training D differing from the test set's
    _sfm_pickle(tmp_path, dim=D + 2)
    with pytest.raises(
        DataValueError, match=rf"sfm120k\.pkl: database has D={D + 2}, but the test features have D={D}"
    ):
        import_train_set(tmp_path, cache, holdout_fraction=0.2, expected_dim=D)
    assert _nothing_left(cache)
    # query D differing from the database's
    rng = np.random.default_rng(1)
    _test_pickle(tmp_path, "rparis6k", query=rng.standard_normal((D - 2, Q)).astype(np.float32))
    with pytest.raises(
        DataValueError,
        match=r"rparis6k\.pkl: 'query' is \(6, 3\) and 'database' is \(8, 12\): query and "
        r"database features must have the same D",
    ) as err:
        import_test_set(tmp_path, "rparis6k", tmp_path / "c2")
    assert "\n" not in str(err.value) and _nothing_left(tmp_path / "c2")
    # ground truth naming a database index out of range
    bad_gt = [{"easy": np.array([N]), "hard": np.array([], np.int64), "junk": np.array([], np.int64), "bbx": None}] * Q
    _test_pickle(tmp_path, "rparis6k", gt=bad_gt)
    with pytest.raises(
        DataValueError, match=rf"rparis6k\.pkl\['gt'\]: query 0: field 'easy' has index {N} outside \[0, {N}\)"
    ):
        import_test_set(tmp_path, "rparis6k", tmp_path / "c3")
    assert _nothing_left(tmp_path / "c3")
