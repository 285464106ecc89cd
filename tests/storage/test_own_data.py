"""Users' own embeddings: list columns in storage.features, few-shot tables, retrieval folders."""

import json
import os
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import DataValueError, SchemaError, StorageError
from storage.features import iter_features, lookup_embeddings, read_features, read_ids, read_metadata
from storage.landmarks import read_gnd
from storage.own_data import (
    check_usable,
    import_fewshot_table,
    import_retrieval_folder,
    label_ground_truth,
    read_retrieval_folder,
    usable_classes,
)


def _emb(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _frame(n=12, d=4, seed=0, splits=("train", "val", "test"), id0=0, labels=None):
    """A pandas frame as a user writes it: a column of numpy rows (list<double> in Parquet)."""
    emb = _emb(n, d, seed).astype(np.float64)
    return pd.DataFrame(
        {
            "id": np.arange(id0, id0 + n),
            "label": labels if labels is not None else [f"c{i % 3}" for i in range(n)],
            "split": [splits[i % len(splits)] for i in range(n)],
            "embedding": list(emb),
        }
    )


def _raw(n=4, d=4, emb=None, **cols):
    """A pyarrow table with a list<float> embedding column (rows may differ in length)."""
    rows = emb if emb is not None else [list(r) for r in _emb(n, d)]
    base = {
        "id": pa.array(np.arange(len(rows)), pa.int64()),
        "label": pa.array(["a"] * len(rows)),
        "split": pa.array(["train"] * len(rows)),
        "embedding": pa.array(rows, pa.list_(pa.float32())),
    }
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


# --- storage.features reads list columns ------------------------------------------------


@pytest.mark.parametrize(
    "typ",
    [
        pa.list_(pa.float32()),
        pa.list_(pa.float64()),
        pa.large_list(pa.float32()),
        pa.large_list(pa.float64()),
        pa.list_(pa.float64(), 5),
    ],
)
def test_features_reads_list_columns_as_float32(tmp_path, typ):
    emb = _emb(7, 5)
    p = tmp_path / "x.parquet"
    table = _raw(emb=[list(map(float, r)) for r in emb])
    pq.write_table(
        table.set_column(3, "embedding", pa.array([list(map(float, r)) for r in emb], typ)), p, row_group_size=3
    )
    t = read_features(p, accept_lists=True)
    assert t.embeddings.dtype == np.float32 and t.embeddings.shape == (7, 5)
    np.testing.assert_allclose(t.embeddings, emb, rtol=1e-6)
    assert [len(b) for b in iter_features(p, 3, accept_lists=True)] == [3, 3, 1]
    got, found = lookup_embeddings(p, np.array([6, 1, 99]), accept_lists=True)
    np.testing.assert_allclose(got[:2], emb[[6, 1]], rtol=1e-6)
    assert found.tolist() == [True, True, False]
    assert read_ids(p, accept_lists=True).tolist() == list(range(7))


def test_features_refuses_lists_without_the_flag_and_bad_lengths(tmp_path):
    p = tmp_path / "x.parquet"
    rows = [[0.0, 1.0, 2.0, 3.0]] * 17 + [[1.0, 2.0, 3.0]] + [[0.5] * 4]
    pq.write_table(_raw(emb=rows, id=pa.array(np.arange(19), pa.int64())), p, row_group_size=5)
    with pytest.raises(
        SchemaError,
        match=r"x\.parquet: embedding has type list<.*float>, expected fixed_size_list"
        r"<float32>\[D\] \(a list<float> column .*accept_lists=True",
    ):
        read_features(p)
    message = r"^x\.parquet: embedding: row id 17 has length 3, expected 4$"
    with pytest.raises(DataValueError, match=message):
        read_features(p, accept_lists=True)
    with pytest.raises(DataValueError, match=message):
        list(iter_features(p, 4, accept_lists=True))
    with pytest.raises(DataValueError, match=message):
        lookup_embeddings(p, np.array([16, 17]), accept_lists=True)
    pq.write_table(_raw(emb=[[], [1.0]]), p)
    with pytest.raises(DataValueError, match=r"^x\.parquet: embedding: row id 0 has length 0, expected a non-empty"):
        read_features(p, accept_lists=True)
    pq.write_table(_raw(emb=[[1.0, 2.0], []]), p)
    with pytest.raises(DataValueError, match=r"^x\.parquet: embedding: row id 1 has length 0, expected 2$"):
        read_features(p, accept_lists=True)
    pq.write_table(_raw(emb=[[1.0, 2.0], [1.0, 2.0]], embedding=pa.array([["a"], ["b"]])), p)
    with pytest.raises(SchemaError, match=r"x\.parquet: embedding has type list<.*string>, expected list<float32"):
        read_features(p, accept_lists=True)


def test_features_list_column_with_metadata_dim_and_expected_dim(tmp_path):
    p = tmp_path / "x.parquet"
    t = _raw(emb=[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    pq.write_table(t.replace_schema_metadata({b"dim": b"2"}), p)
    with pytest.raises(DataValueError, match=r"row id 0 has length 3, expected 2"):
        read_features(p, accept_lists=True)
    pq.write_table(t, p)
    with pytest.raises(SchemaError, match=r"x\.parquet: embedding has dim 3, expected 8"):
        read_features(p, accept_lists=True, expected_dim=8)


# --- few-shot tables ------------------------------------------------------------------


def test_pandas_table_imports_to_a_canonical_table(tmp_path):
    df = _frame(12, 4)
    src = tmp_path / "mine.parquet"
    df.to_parquet(src)
    assert pq.ParquetFile(src).schema_arrow.field("embedding").type == pa.list_(pa.float64())
    out = import_fewshot_table(src, tmp_path / "cache")
    assert out.dim == 4 and out.n_rows == 12 and out.counts == {"train": 4, "val": 4, "test": 4}
    assert out.path.parent == tmp_path / "cache" and out.path.name.startswith("mine-")
    assert pq.ParquetFile(out.path).schema_arrow.field("embedding").type == pa.list_(pa.float32(), 4)
    meta = read_metadata(out.path)
    assert (
        meta["backbone"] == "none"
        and meta["dim"] == "4"
        and meta["dataset"] == "mine"
        and len(meta["source_hash"]) == 16
    )
    t = read_features(out.path, split="val")
    np.testing.assert_allclose(t.embeddings, np.stack(df.embedding[df.split == "val"]).astype(np.float32))
    assert t.labels.tolist() == df.label[df.split == "val"].tolist()
    # same source: skipped (the file is not rewritten); touched source: a new output
    mtime = out.path.stat().st_mtime_ns
    assert import_fewshot_table(src, tmp_path / "cache") == out and out.path.stat().st_mtime_ns == mtime
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    again = import_fewshot_table(src, tmp_path / "cache")
    assert again.path != out.path and again.counts == out.counts


def test_pyarrow_fixed_size_float32_and_int_labels(tmp_path):
    emb = _emb(6, 3)
    src = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(np.arange(10, 16), pa.int32()),
                "label": pa.array(np.arange(6) % 2),
                "split": pa.array(["train"] * 3 + ["test"] * 3),
                "path": pa.array([f"img/{i}.jpg" for i in range(6)]),
                "extra": pa.array(np.ones(6)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 3),
            }
        ),
        src,
    )
    out = import_fewshot_table(src, tmp_path / "c")
    t = read_features(out.path)
    assert t.ids.tolist() == list(range(10, 16)) and t.labels.dtype == np.int64 and t.paths[2] == "img/2.jpg"
    np.testing.assert_array_equal(t.embeddings, emb)
    assert out.counts == {"train": 3, "val": 0, "test": 3}


def test_polars_table(tmp_path):
    pl = pytest.importorskip("polars")
    emb = _emb(5, 3)
    src = tmp_path / "p.parquet"
    pl.DataFrame(
        {
            "id": list(range(5)),
            "label": ["a", "b", "a", "b", "a"],
            "split": ["train"] * 5,
            "embedding": [list(map(float, r)) for r in emb],
        }
    ).write_parquet(src)
    t = read_features(import_fewshot_table(src, tmp_path / "c").path)
    np.testing.assert_allclose(t.embeddings, emb, rtol=1e-6)


def test_folder_of_parquet_files_in_row_groups(tmp_path):
    src = tmp_path / "tables"
    src.mkdir()
    parts = [_frame(30, 8, seed=s, id0=100 * s) for s in range(3)]
    for s, df in enumerate(parts):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src / f"part-{s}.parquet", row_group_size=7)
    (src / "notes.txt").write_text("ignored")
    out = import_fewshot_table(src, tmp_path / "c")
    assert out.n_rows == 90 and out.path.name.startswith("tables-")
    t = read_features(out.path)
    want = pd.concat(parts)
    assert t.ids.tolist() == want.id.tolist()
    np.testing.assert_allclose(t.embeddings, np.stack(want.embedding).astype(np.float32))


def _write(path, table):
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": None}, r"^x\.parquet: missing column 'label' \(expected columns id, label, split, embedding"),
        ({"split": None}, r"^x\.parquet: missing column 'split'"),
        ({"embedding": None}, r"^x\.parquet: missing column 'embedding'"),
        ({"id": None}, r"^x\.parquet: missing column 'id'"),
        (
            {"split": pa.array(["train", "val", "tset", "test"])},
            r"^x\.parquet: split: unknown value 'tset' at id 2 \(expected one of train, val, test\)$",
        ),
        ({"id": pa.array([0, 1, 1, 3])}, r"^x\.parquet: id 1 is duplicated"),
        ({"label": pa.array([1.5, 2.5, 1.5, 2.5])}, r"^x\.parquet: label has type double, expected int or string$"),
        ({"label": pa.array(["a", None, "b", "c"])}, r"^x\.parquet: label is missing for id 1$"),
    ],
)
def test_bad_fewshot_tables(tmp_path, change, message):
    src = _write(tmp_path / "x.parquet", _raw(**change))
    with pytest.raises(StorageError, match=message):
        import_fewshot_table(src, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else True


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [[1.0, 2.0, 3.0, 4.0]] * 17 + [[1.0, 2.0, 3.0]],
            r"^x\.parquet: embedding: row id 17 has length 3, expected 4$",
        ),
        ([[]] + [[1.0]] * 3, r"^x\.parquet: embedding: row id 0 has length 0, expected a non-empty list"),
        ([[1.0, 2.0]] * 5 + [[1.0, float("nan")]], r"^x\.parquet: embedding of id 5 has NaN or inf values$"),
        ([[1.0, 2.0]] * 2 + [[float("inf"), 1.0]], r"^x\.parquet: embedding of id 2 has NaN or inf values$"),
        ([[1.0, 2.0], None], r"^x\.parquet: embedding is missing for id 1$"),
    ],
)
def test_bad_embeddings_name_the_id_and_leave_no_output(tmp_path, rows, message):
    src = _write(tmp_path / "x.parquet", _raw(emb=rows))
    with pytest.raises(DataValueError, match=message):
        import_fewshot_table(src, tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_folder_checks_dim_label_type_and_ids_across_files(tmp_path):
    src = tmp_path / "f"
    src.mkdir()
    _frame(4, 4).to_parquet(src / "a.parquet")
    _frame(4, 8, id0=10).to_parquet(src / "b.parquet")
    with pytest.raises(
        SchemaError, match=r"^b\.parquet: embedding has D=8, but a\.parquet has D=4; the files of f must"
    ):
        import_fewshot_table(src, tmp_path / "c")
    _frame(4, 4, id0=3).to_parquet(src / "b.parquet")
    with pytest.raises(DataValueError, match=r"^b\.parquet: id 3 is duplicated \(also in a\.parquet\)"):
        import_fewshot_table(src, tmp_path / "c")
    _frame(4, 4, id0=10, labels=[1, 2, 3, 4]).to_parquet(src / "b.parquet")
    with pytest.raises(SchemaError, match=r"^b\.parquet: label has type int64, but a\.parquet has string"):
        import_fewshot_table(src, tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StorageError, match=r"empty: no \*\.parquet files"):
        import_fewshot_table(empty, tmp_path / "c")


def test_usable_classes_and_check_usable():
    labels = ["a"] * 4 + ["b"] * 2 + ["c"] * 16 + ["d"] * 20 + ["e"] * 16
    usable, left_out = usable_classes(labels, 16)
    assert usable == ["c", "d", "e"] and left_out == {"a": 4, "b": 2}
    assert check_usable("test", labels, 3, 16, "mine.parquet") == ["c", "d", "e"]
    with pytest.raises(
        DataValueError,
        match=r"^mine\.parquet: split 'test' has 3 classes with >= 16 items, "
        r"n_way is 5 \(left out: a \(4\), b \(2\)\)$",
    ):
        check_usable("test", labels, 5, 16, "mine.parquet")
    assert usable_classes(np.array([3, 3, 1]), 2) == ([3], {1: 1})


# --- retrieval folders ----------------------------------------------------------------


def _retrieval_folder(root, d=6, n_train=60, n_db=20, n_q=4, gnd=None, db_d=None):
    root.mkdir()
    rng = np.random.default_rng(0)

    def frame(n, dim, labels, id0, path=False):
        cols = {"id": np.arange(id0, id0 + n), "label": labels, "embedding": list(rng.standard_normal((n, dim)))}
        if path:
            cols["path"] = [f"img{id0 + i}.jpg" for i in range(n)]
        return pd.DataFrame(cols)

    frame(n_train, d, np.arange(n_train) % 20, 0).to_parquet(root / "train.parquet")
    frame(n_db, db_d or d, [f"L{i % 5}" for i in range(n_db)], 1000, path=True).to_parquet(root / "database.parquet")
    frame(n_q, d, [f"L{i % 5}" for i in range(n_q)], 5000).to_parquet(root / "queries.parquet")
    if gnd is not None:
        with open(root / "gnd.pkl", "wb") as f:
            pickle.dump(gnd, f)
    return root


def test_label_ground_truth():
    gt = label_ground_truth(["b", "a"], ["a", "b", "a", "c"])
    assert [g["easy"].tolist() for g in gt.gnd] == [[1], [0, 2]]
    assert gt.gnd[0]["hard"].tolist() == [] and gt.gnd[0]["junk"].tolist() == [] and gt.imlist == ["0", "1", "2", "3"]
    with pytest.raises(DataValueError, match=r"^q: query 1 has label 7, which no database item has"):
        label_ground_truth([1, 7], [1, 2], source="q")


def test_retrieval_folder_without_gnd_uses_labels(tmp_path):
    root = _retrieval_folder(tmp_path / "mine")
    own = read_retrieval_folder(root)
    assert (own.dim, own.n_train, own.n_queries, own.n_database, own.gnd_path) == (6, 60, 4, 20, None)
    assert own.ground_truth.gnd[1]["easy"].tolist() == [1, 6, 11, 16]
    assert own.ground_truth.imlist[0] == "img1000.jpg" and own.ground_truth.qimlist[0] == "5000"
    imp = import_retrieval_folder(root, tmp_path / "cache", holdout_fraction=0.25, holdout_seed=1)
    db, q = read_features(imp.test.database), read_features(imp.test.query)
    assert db.ids.tolist() == list(range(20)) and q.ids.tolist() == list(range(4)) and imp.test.dim == 6
    assert db.paths[3] == "img1003.jpg" and set(db.splits) == {"database"} and set(q.splits) == {"query"}
    src = pq.read_table(root / "database.parquet").column("embedding").to_pylist()
    np.testing.assert_allclose(db.embeddings, np.asarray(src, np.float32))
    gt = read_gnd(imp.test.gnd, n_db=20)
    assert gt.gnd[1]["easy"].tolist() == [1, 6, 11, 16]
    train = read_features(imp.train.table)
    assert imp.train.n_train + imp.train.n_val == 60 and imp.train.n_val > 0 and imp.train.n_train > 0
    held = {int(c) for c, s in zip(train.labels, train.splits) if s == "val"}
    kept = {int(c) for c, s in zip(train.labels, train.splits) if s == "train"}
    assert held and not held & kept  # whole clusters are held out
    # imported once
    assert import_retrieval_folder(root, tmp_path / "cache", holdout_fraction=0.25, holdout_seed=1) == imp
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_retrieval_folder_with_gnd_pkl(tmp_path):
    gnd = {
        "imlist": [],
        "qimlist": ["q0", "q1", "q2", "q3"],
        "gnd": [{"easy": [0, 2], "hard": [3], "junk": []} for _ in range(4)],
    }
    root = _retrieval_folder(tmp_path / "g", gnd=gnd)
    own = read_retrieval_folder(root)
    assert own.gnd_path == root / "gnd.pkl" and own.ground_truth.gnd[0]["hard"].tolist() == [3]
    imp = import_retrieval_folder(root, tmp_path / "cache")
    gt = json.loads(imp.test.gnd.read_text())
    assert gt["qimlist"] == ["q0", "q1", "q2", "q3"] and len(gt["imlist"]) == 20 and gt["gnd"][2]["easy"] == [0, 2]


def test_retrieval_folder_errors(tmp_path):
    root = _retrieval_folder(tmp_path / "dim", db_d=8)
    with pytest.raises(
        SchemaError,
        match=r"^database\.parquet: embedding has D=8, but train\.parquet has D=6; "
        r"train, queries and database must have the same D$",
    ):
        read_retrieval_folder(root)
    gnd = {
        "imlist": [],
        "qimlist": ["q0", "q1", "q2", "q3"],
        "gnd": [{"easy": [0, 20], "hard": [], "junk": []} for _ in range(4)],
    }
    root = _retrieval_folder(tmp_path / "range", gnd=gnd)
    with pytest.raises(DataValueError, match=r"gnd\.pkl: query 0: field 'easy' has index 20 outside \[0, 20\)"):
        read_retrieval_folder(root)
    gnd = {"imlist": [], "qimlist": ["q0"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}
    root = _retrieval_folder(tmp_path / "nq", gnd=gnd)
    with pytest.raises(DataValueError, match=r"gnd\.pkl: qimlist has 1 queries, but queries\.parquet has 4 rows"):
        read_retrieval_folder(root)
    root = _retrieval_folder(tmp_path / "nolabel")
    pq.write_table(pq.read_table(root / "queries.parquet").drop_columns(["label"]), root / "queries.parquet")
    with pytest.raises(SchemaError, match=r"queries\.parquet: missing column 'label' .*without gnd\.pkl or gnd\.json"):
        read_retrieval_folder(root)
    (root / "train.parquet").unlink()
    with pytest.raises(StorageError, match=r"train\.parquet: not found \(a retrieval folder holds"):
        read_retrieval_folder(root)
    root = _retrieval_folder(tmp_path / "nan")
    t = pq.read_table(root / "database.parquet")
    rows = t.column("embedding").to_pylist()
    rows[7][2] = float("nan")
    pq.write_table(
        t.set_column(t.schema.get_field_index("embedding"), "embedding", pa.array(rows)), root / "database.parquet"
    )
    read_retrieval_folder(root)  # values are checked on import
    with pytest.raises(DataValueError, match=r"^database\.parquet: embedding of id 1007 has NaN or inf values$"):
        import_retrieval_folder(root, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_feature_table_writer_streams_batches_atomically(tmp_path):
    from storage.features import FeatureTableWriter

    meta = {"dataset": "x", "backbone": "none", "checkpoint_hash": "none"}
    p = tmp_path / "w.parquet"
    with FeatureTableWriter(p, dim=3, label_type=pa.string(), metadata=meta, has_path=True) as w:
        w.write(ids=np.arange(2), labels=["a", "b"], splits="train", embeddings=np.ones((2, 3)), paths=["p0", "p1"])
        w.write(
            ids=np.arange(2, 5),
            labels=pa.array(["a", "c", "c"]),
            splits=["val", "test", "test"],
            embeddings=np.zeros((3, 3)),
            paths=["p2", "p3", "p4"],
        )
    t = read_features(p)
    assert t.ids.tolist() == list(range(5)) and t.splits.tolist()[2:] == ["val", "test", "test"] and t.paths[4] == "p4"
    assert t.metadata["dim"] == "3" and pq.ParquetFile(p).schema_arrow.field("embedding").type == pa.list_(
        pa.float32(), 3
    )
    q = tmp_path / "dup.parquet"
    with pytest.raises(DataValueError, match=r"^dup\.parquet: id 1 is duplicated"):
        with FeatureTableWriter(q, dim=3, label_type=pa.int64(), metadata=meta) as w:
            w.write(ids=np.arange(2), labels=[1, 2], splits="train", embeddings=np.ones((2, 3)))
            w.write(ids=np.arange(1, 3), labels=[1, 2], splits="train", embeddings=np.ones((2, 3)))
    with pytest.raises(DataValueError, match=r"^dup\.parquet: embedding of id 0 has NaN"):
        with FeatureTableWriter(q, dim=3, label_type=pa.int64(), metadata=meta) as w:
            w.write(ids=np.arange(1), labels=[1], splits="train", embeddings=np.full((1, 3), np.nan))
    assert sorted(os.listdir(tmp_path)) == ["w.parquet"]
