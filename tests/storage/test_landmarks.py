import json
import pickle

import numpy as np
import pytest

from storage.cli import main as cli_main
from storage.errors import DataValueError, SchemaError, UnsafePickleError
from storage.features import read_features
from storage.landmarks import import_landmarks, read_gnd_json, read_landmark_pickle, read_revisited_gnd


def _gnd(n_db=6, n_q=2):
    return {
        "imlist": [f"im{i}" for i in range(n_db)],
        "qimlist": [f"q{i}" for i in range(n_q)],
        "gnd": [
            {"easy": [0, 1], "hard": [2], "junk": [], "bbx": [1.0, 2.0, 30.5, 40.0]},
            {"easy": np.array([3]), "hard": [], "junk": [4, 5], "bbx": None},
        ][:n_q],
    }


def _dump(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_read_revisited_gnd(tmp_path):
    gt = read_revisited_gnd(_dump(tmp_path / "gnd_roxford5k.pkl", _gnd()))
    assert gt.imlist[5] == "im5" and gt.qimlist == ["q0", "q1"]
    assert gt.gnd[0]["easy"].dtype == np.int64 and list(gt.gnd[1]["junk"]) == [4, 5]
    assert gt.gnd[0]["bbx"] == [1.0, 2.0, 30.5, 40.0] and gt.gnd[1]["bbx"] is None


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda g: g.pop("qimlist"), SchemaError, r"gnd\.pkl: missing key 'qimlist'"),
        (lambda g: g["gnd"][1].pop("junk"), SchemaError, r"gnd\.pkl: query 1: missing field 'junk'"),
        (
            lambda g: g["gnd"][0].update(hard=[6]),
            DataValueError,
            r"gnd\.pkl: query 0: field 'hard' has index 6 outside \[0, 6\)",
        ),
        (
            lambda g: g["gnd"][0].update(bbx=[1, 2]),
            SchemaError,
            r"gnd\.pkl: query 0: field 'bbx' must be 4 finite numbers",
        ),
        (lambda g: g["gnd"].pop(), SchemaError, r"gnd\.pkl: gnd has 1 entries, expected one per query \(2\)"),
    ],
)
def test_gnd_errors(tmp_path, mutate, error, message):
    g = _gnd()
    mutate(g)
    with pytest.raises(error, match=message):
        read_revisited_gnd(_dump(tmp_path / "gnd.pkl", g))


def test_landmark_pickle_is_transposed(tmp_path):
    rng = np.random.default_rng(0)
    X, Q = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)  # (D, N)
    feats = read_landmark_pickle(_dump(tmp_path / "a.pkl", {"X": X, "Q": Q}))
    np.testing.assert_array_equal(feats.database, X.T)
    assert feats.database.flags["C_CONTIGUOUS"] and feats.query.shape == (2, 8)
    sfm = read_landmark_pickle(_dump(tmp_path / "b.pkl", {"feat": X, "cluster": np.arange(6) % 3}))
    assert sfm.database.shape == (6, 8) and sfm.query is None and list(sfm.cluster) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(SchemaError, match=r"c\.pkl: no database features; expected one of the keys"):
        read_landmark_pickle(_dump(tmp_path / "c.pkl", {"other": X}))
    with pytest.raises(SchemaError, match=r"d\.pkl: 'cluster' has 5 labels, but 'X' is \(8, 6\)"):
        read_landmark_pickle(_dump(tmp_path / "d.pkl", {"X": X, "cluster": np.arange(5)}))


def test_landmark_pickle_refuses_objects(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: pickle references forbidden global os\.system"):
        read_landmark_pickle(p)


def test_import_landmarks_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    X, Q = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    pkl = _dump(tmp_path / "gl18_resnet101_roxford5k.pkl", {"X": X, "Q": Q}, protocol=2)
    gnd = _dump(tmp_path / "gnd_roxford5k.pkl", _gnd())
    out = tmp_path / "out"
    assert cli_main(["data", "import-landmarks", str(pkl), "--out", str(out), "--gnd", str(gnd)]) == 0
    db = read_features(out / "database.parquet", expected_dim=4)
    np.testing.assert_allclose(db.embeddings, X.T)
    assert db.metadata["dataset"] == "roxford5k" and db.metadata["backbone"] == "gl18_resnet101"
    assert db.paths == [f"im{i}" for i in range(6)] and set(db.splits) == {"database"}
    q = read_features(out / "query.parquet")
    np.testing.assert_allclose(q.embeddings, Q.T)
    assert json.loads((out / "gnd.json").read_text())["gnd"][1] == {
        "easy": [3],
        "hard": [],
        "junk": [4, 5],
        "bbx": None,
    }
    assert read_gnd_json(out / "gnd.json").qimlist == ["q0", "q1"]
    # ground truth that does not fit the features: one clear line, exit code 2
    bad = _dump(tmp_path / "gnd_bad.pkl", _gnd(n_db=7))
    assert cli_main(["data", "import-landmarks", str(pkl), "--out", str(out), "--gnd", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gnd_bad.pkl: imlist has 7 images" in err and "Traceback" not in err


def test_import_sfm120k_without_gnd(tmp_path):
    X = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    out = import_landmarks(
        _dump(tmp_path / "gl18_resnet101_sfm120k.pkl", {"X": X, "cluster": np.array([0, 0, 1, 1, 2])}), tmp_path / "out"
    )
    assert set(out) == {"database"}
    t = read_features(out["database"])
    assert list(t.labels) == [0, 0, 1, 1, 2] and t.metadata["dataset"] == "sfm120k"
