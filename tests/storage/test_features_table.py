import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import CorruptFileError, DataValueError, SchemaError, StorageError
from storage.features import features_hash, iter_features, read_features, read_ids, read_metadata, write_features

META = {"dataset": "glyphs", "backbone": "conv4", "checkpoint_hash": "abc"}


def _emb(n=10, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _raw_table(n=4, d=8, **over):
    """A table written without write_features' validation (to craft bad files)."""
    emb = over.pop("emb", _emb(n, d))
    cols = {
        "id": pa.array(np.arange(n), pa.int64()),
        "label": pa.array([f"c{i % 2}" for i in range(n)]),
        "split": pa.array(["train"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]),
    }
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_round_trip_with_string_labels_and_paths(tmp_path):
    p = tmp_path / "features.parquet"
    emb = _emb(10, 8)
    write_features(
        p,
        ids=np.arange(100, 110),
        labels=[f"c{i % 3}" for i in range(10)],
        splits=["train"] * 6 + ["val"] * 4,
        embeddings=emb,
        paths=[f"c/{i}.png" for i in range(10)],
        metadata=META,
    )
    t = read_features(p)
    np.testing.assert_array_equal(t.ids, np.arange(100, 110))
    np.testing.assert_array_equal(t.embeddings, emb)
    assert t.labels[4] == "c1" and t.paths[3] == "c/3.png" and t.dim == 8
    assert t.metadata == {**META, "dim": "8"}
    assert pq.ParquetFile(p).schema_arrow.field("embedding").type == pa.list_(pa.float32(), 8)
    val = read_features(p, split="val", expected_dim=8)
    np.testing.assert_array_equal(val.ids, np.arange(106, 110))
    assert read_metadata(p)["backbone"] == "conv4" and len(features_hash(p)) == 64


def test_int_labels_no_paths_and_streaming(tmp_path):
    p = tmp_path / "f.parquet"
    emb = _emb(25, 4)
    write_features(p, ids=np.arange(25), labels=np.arange(25) % 5, splits="test", embeddings=emb, metadata=META)
    batches = list(iter_features(p, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert batches[0].labels.dtype == np.int64 and batches[0].paths is None
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), emb)
    assert [len(b) for b in iter_features(p, 10, split="train")] == []


def test_write_validation(tmp_path):
    p = tmp_path / "f.parquet"
    emb = _emb(3, 4)
    with pytest.raises(DataValueError, match=r"f\.parquet: id 1 is duplicated"):
        write_features(p, ids=[0, 1, 1], labels=[0, 1, 2], splits="train", embeddings=emb, metadata=META)
    emb[2, 1] = np.nan
    with pytest.raises(DataValueError, match=r"f\.parquet: embedding of id 7 has NaN or inf"):
        write_features(p, ids=[5, 6, 7], labels=[0, 1, 2], splits="train", embeddings=emb, metadata=META)
    with pytest.raises(SchemaError, match=r"metadata lacks \['checkpoint_hash'\]"):
        write_features(
            p,
            ids=[0, 1, 2],
            labels=[0, 1, 2],
            splits="train",
            embeddings=_emb(3, 4),
            metadata={"dataset": "x", "backbone": "y"},
        )
    with pytest.raises(SchemaError, match="label has 2 rows, expected 3"):
        write_features(p, ids=[0, 1, 2], labels=[0, 1], splits="train", embeddings=_emb(3, 4), metadata=META)
    with pytest.raises(SchemaError, match="embedding has dim 4, but metadata dim says 8"):
        write_features(
            p, ids=[0, 1, 2], labels=[0, 1, 2], splits="train", embeddings=_emb(3, 4), metadata={**META, "dim": "8"}
        )
    assert not p.exists()


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"split": None}, SchemaError, r"bad\.parquet: missing column\(s\) \['split'\]"),
        ({"extra": pa.array([1, 2, 3, 4])}, SchemaError, r"bad\.parquet: unexpected column\(s\) \['extra'\]"),
        ({"id": pa.array([0, 1, 2, 2], pa.int64())}, DataValueError, r"bad\.parquet: id 2 is duplicated"),
        ({"label": pa.array(["a", None, "b", "c"])}, DataValueError, r"bad\.parquet: label is missing for id 1"),
        ({"id": pa.array([0, 1, 2, 3], pa.int32())}, SchemaError, r"bad\.parquet: id has type int32, expected int64"),
        (
            {"embedding": pa.array([[1.0], [2.0], [3.0], [4.0]])},
            SchemaError,
            r"bad\.parquet: embedding has type list<.*double>, expected fixed_size_list<float32>\[D\]",
        ),
    ],
)
def test_bad_tables(tmp_path, change, error, message):
    p = tmp_path / "bad.parquet"
    pq.write_table(_raw_table(**change), p)
    with pytest.raises(error, match=message):
        read_features(p)


def test_nan_names_first_bad_id(tmp_path):
    emb = _emb(4, 8)
    emb[2, 0] = np.inf
    emb[3, 0] = np.nan
    p = tmp_path / "bad.parquet"
    pq.write_table(_raw_table(emb=emb), p)
    with pytest.raises(DataValueError, match=r"bad\.parquet: embedding of id 2 has NaN or inf"):
        read_features(p)
    with pytest.raises(DataValueError, match=r"id 2"):
        list(iter_features(p, 2))


def test_dim_checks(tmp_path):
    p = tmp_path / "features.parquet"
    write_features(p, ids=np.arange(3), labels=[0, 1, 2], splits="train", embeddings=_emb(3, 512), metadata=META)
    with pytest.raises(SchemaError, match=r"features\.parquet: embedding has dim 512, expected 640"):
        read_features(p, expected_dim=640)
    t = pq.read_table(p)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"dim": b"640"}), p)
    with pytest.raises(SchemaError, match=r"embedding has dim 512, but metadata dim says 640"):
        read_features(p)


def test_truncated_missing_and_non_parquet(tmp_path):
    p = tmp_path / "features.parquet"
    write_features(
        p, ids=np.arange(50), labels=np.zeros(50, int), splits="train", embeddings=_emb(50, 16), metadata=META
    )
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"features\.parquet: not a readable Parquet file"):
        read_features(p)
    p.write_text("id,label\n1,2\n")
    with pytest.raises(CorruptFileError, match=r"features\.parquet: not a readable Parquet file"):
        read_features(p)
    with pytest.raises(StorageError, match=r"nothere\.parquet: features file not found"):
        read_features(tmp_path / "nothere.parquet")


def test_lookup_reads_only_the_row_groups_of_the_ids_asked_for(tmp_path, monkeypatch):
    import storage.features as features
    from storage.features import lookup_embeddings

    monkeypatch.setattr(features, "ROW_GROUP_SIZE", 10)
    p = tmp_path / "q.parquet"
    emb = _emb(55, 4)
    write_features(p, ids=np.arange(55), labels=np.zeros(55, np.int64), splits="query", embeddings=emb, metadata=META)
    assert pq.ParquetFile(p).metadata.num_row_groups == 6
    read = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(
        pq.ParquetFile, "iter_batches", lambda self, *a, **kw: read.append(kw.get("row_groups")) or real(self, *a, **kw)
    )
    got, found = lookup_embeddings(p, np.array([23, 12, 29, 12]), expected_dim=4)
    assert read == [[1, 2]] and found.all()
    np.testing.assert_array_equal(got, emb[[23, 12, 29, 12]])
    got, found = lookup_embeddings(p, np.array([54, 70]))
    assert found.tolist() == [True, False] and not got[1].any()
    with pytest.raises(SchemaError, match="q.parquet: embedding has dim 4, expected 8"):
        lookup_embeddings(p, np.array([1]), expected_dim=8)


def test_lookup_in_an_unsorted_table_and_bad_rows(tmp_path):
    from storage.features import lookup_embeddings

    p = tmp_path / "u.parquet"
    ids = np.random.default_rng(0).permutation(40)
    emb = _emb(40, 4)
    write_features(p, ids=ids, labels=np.zeros(40, np.int64), splits="query", embeddings=emb, metadata=META)
    got, found = lookup_embeddings(p, np.arange(40))
    assert found.all()
    np.testing.assert_array_equal(got[ids], emb)
    bad = _emb(4, 8)
    bad[2, 1] = np.nan
    pq.write_table(_raw_table(emb=bad), tmp_path / "nan.parquet")
    assert lookup_embeddings(tmp_path / "nan.parquet", np.array([0, 1]))[1].all()  # row 2 not asked for
    with pytest.raises(DataValueError, match="nan.parquet: embedding of id 2 has NaN or inf values"):
        lookup_embeddings(tmp_path / "nan.parquet", np.array([2]))
    pq.write_table(_raw_table(id=pa.array([0, 1, 1, 3], pa.int64())), tmp_path / "dup.parquet")
    with pytest.raises(DataValueError, match="dup.parquet: id 1 is duplicated"):
        lookup_embeddings(tmp_path / "dup.parquet", np.array([1, 3]))


def test_read_ids_reads_the_id_column_in_row_order(tmp_path):
    p = tmp_path / "f.parquet"
    ids = np.array([7, 3, 1000, 5])
    write_features(p, ids=ids, labels=[0] * 4, splits="database", embeddings=np.ones((4, 3)), metadata=META)
    got = read_ids(p)
    assert got.dtype == np.int64 and got.tolist() == [7, 3, 1000, 5]
    pq.write_table(
        pa.table(
            {
                "id": pa.array([1, 1], pa.int64()),
                "label": [0, 0],
                "split": ["a", "a"],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0], pa.float32()), 1),
            }
        ),
        tmp_path / "dup.parquet",
    )
    with pytest.raises(DataValueError, match=r"dup\.parquet: id 1 is duplicated"):
        read_ids(tmp_path / "dup.parquet")
