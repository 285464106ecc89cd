import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.simstore as simstore
import storage.topk as topk
from storage.errors import CorruptFileError, DataValueError, ManifestError, SchemaError
from storage.simstore import SimilarityStore, build_topk_store, create_store


def _feats(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q, db, k, exclude_diag=False):
    s = q @ db.T
    if exclude_diag:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def test_build_matches_brute_force(tmp_path):
    q, db = _feats(70, seed=1), _feats(200, seed=2)
    store = build_topk_store(
        q, np.arange(70) + 1000, db, np.arange(200), tmp_path / "s", 12, shard_size=25, block_size=8, db_block_size=64
    )
    assert (store.k, store.n_queries, store.n_shards) == (12, 70, 3) and store.is_complete()
    ids, scores = _brute(q, db, 12)
    shards = list(store.iter_shards())
    assert [len(s) for s in shards] == [25, 25, 20]
    np.testing.assert_array_equal(np.concatenate([s.query_ids for s in shards]), np.arange(70) + 1000)
    np.testing.assert_array_equal(np.concatenate([s.neighbor_ids for s in shards]), ids)
    np.testing.assert_allclose(np.concatenate([s.scores for s in shards]), scores, rtol=1e-5, atol=1e-6)
    m = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    assert m["shards"][2] | {"sha256": None} == {
        "file": "part-00002.parquet",
        "first_row": 50,
        "n_rows": 20,
        "complete": True,
        "sha256": None,
    }
    assert set(m["source_hashes"]) == {"queries", "database"}
    t = pq.read_table(tmp_path / "s" / "part-00000.parquet")
    assert t.schema.field("neighbor_ids").type == pa.list_(pa.int64(), 12)
    assert t.schema.field("scores").type == pa.list_(pa.float32(), 12)


def test_exclude_self(tmp_path):
    x = _feats(60)
    store = build_topk_store(
        x,
        np.arange(60),
        x,
        np.arange(60),
        tmp_path / "s",
        5,
        shard_size=100,
        exclude_self=True,
        source_hashes={"features": "h1"},
    )
    sh = store.read_shard(0)
    ids, _ = _brute(x, x, 5, exclude_diag=True)
    np.testing.assert_array_equal(sh.neighbor_ids, ids)
    assert store.source_hashes == {"features": "h1"}


def test_k_larger_than_database(tmp_path):
    x = _feats(10)
    with pytest.raises(ValueError, match="k=11 but the database has 10 items; need 1 <= k <= 10"):
        build_topk_store(x, np.arange(10), x, np.arange(10), tmp_path / "s", 11)
    with pytest.raises(ValueError, match=r"k=10 but the database has 10 items \(one is excluded as self\)"):
        build_topk_store(x, np.arange(10), x, np.arange(10), tmp_path / "s", 10, exclude_self=True)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_resume_redoes_only_damaged_shard(tmp_path, monkeypatch, damage):
    q, db = _feats(50, seed=3), _feats(80, seed=4)
    args = (q, np.arange(50), db, np.arange(80), tmp_path / "s", 7)
    store = build_topk_store(*args, shard_size=20)
    before = [store.read_shard(i).neighbor_ids for i in range(3)]
    p1 = store.shard_path(1)
    if damage == "delete":
        p1.unlink()
    else:
        p1.write_bytes(p1.read_bytes()[:100])
    assert SimilarityStore(tmp_path / "s").pending_shards() == [1]
    with pytest.raises((ManifestError, CorruptFileError), match="part-00001.parquet"):
        SimilarityStore(tmp_path / "s").read_shard(1)
    calls = []
    real = simstore.topk_search
    monkeypatch.setattr(simstore, "topk_search", lambda qq, *a, **kw: calls.append(len(qq)) or real(qq, *a, **kw))
    store = build_topk_store(*args, shard_size=20)
    assert calls == [20] and store.is_complete()
    for i in range(3):
        np.testing.assert_array_equal(store.read_shard(i).neighbor_ids, before[i])
    calls.clear()
    build_topk_store(*args, shard_size=20)
    assert calls == []


def test_rerun_with_other_inputs_is_refused(tmp_path):
    x = _feats(30)
    build_topk_store(x, np.arange(30), x, np.arange(30), tmp_path / "s", 4, shard_size=10)
    with pytest.raises(ManifestError, match=r"manifest\.json: existing store has k=4, requested 5"):
        build_topk_store(x, np.arange(30), x, np.arange(30), tmp_path / "s", 5, shard_size=10)
    with pytest.raises(ManifestError, match="existing store has source_hashes"):
        build_topk_store(x * 0.5, np.arange(30), x, np.arange(30), tmp_path / "s", 4, shard_size=10)


def test_distributed_write_protocol(tmp_path):
    store = create_store(tmp_path / "s", k=3, n_queries=5, n_shards=2, shard_size=3, source_hashes={"f": "x"}, n_db=10)
    assert store.pending_shards() == [0, 1] and not store.is_complete()
    info = store.write_shard(1, np.array([3, 4]), np.array([[1, 2, 3], [4, 5, 6]]), np.ones((2, 3)))
    assert SimilarityStore(tmp_path / "s").pending_shards() == [0, 1]  # manifest untouched
    store.mark_complete(1, info)
    reopened = create_store(tmp_path / "s", 3, 5, 2, 3, {"f": "x"}, n_db=10)
    assert reopened.pending_shards() == [0]
    with pytest.raises(ManifestError, match="part-00000.parquet: shard 0 is not complete"):
        reopened.read_shard(0)
    with pytest.raises(SchemaError, match=r"part-00000\.parquet: neighbor_ids has shape \(3, 2\), expected \(3, 3\)"):
        store.write_shard(0, np.arange(3), np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(
        DataValueError, match=r"part-00000\.parquet: neighbor_ids of query_id 1 has id 10 outside \[0, 10\)"
    ):
        store.write_shard(0, np.arange(3), np.array([[0, 1, 2], [10, 1, 2], [0, 1, 2]]), np.zeros((3, 3)))
    with pytest.raises(DataValueError, match=r"part-00000\.parquet: scores of query_id 2 has NaN"):
        store.write_shard(0, np.arange(3), np.zeros((3, 3)), np.array([[0, 0, 0], [0, 0, 0], [0, np.nan, 0]]))


def _write_raw_shard(store, i, table):
    pq.write_table(table, store.shard_path(i))
    info = {
        "file": simstore.shard_file(i),
        "first_row": store.shard_rows(i)[0],
        "n_rows": store.shard_rows(i)[1],
        "complete": True,
    }
    store.mark_complete(i, info)


def _table(n, k, ids=None, scores=None, **extra):
    ids = np.zeros((n, k), np.int64) if ids is None else ids
    scores = np.zeros((n, k), np.float32) if scores is None else scores
    cols = {
        "query_id": pa.array(np.arange(n), pa.int64()),
        "neighbor_ids": pa.array([list(r) for r in ids], pa.list_(pa.int64())),
        "scores": pa.array([list(r) for r in scores], pa.list_(pa.float32())),
    }
    cols.update(extra)
    return pa.table({k: v for k, v in cols.items() if v is not None})


@pytest.mark.parametrize(
    "table, error, message",
    [
        (_table(4, 2), ManifestError, r"part-00000\.parquet: neighbor_ids row 0 has length 2, manifest K is 3"),
        (_table(3, 3), ManifestError, r"part-00000\.parquet: has 3 rows, manifest says 4"),
        (
            _table(4, 3, scores=None, extra=pa.array([1, 2, 3, 4])),
            SchemaError,
            r"part-00000\.parquet: columns .*extra \['extra'\]",
        ),
        (_table(4, 3, scores=None, query_id=None), SchemaError, r"part-00000\.parquet: .*missing \['query_id'\]"),
        (
            _table(4, 3, ids=np.full((4, 3), 99)),
            DataValueError,
            r"part-00000\.parquet: neighbor_ids of query_id 0 has id 99 outside \[0, 10\)",
        ),
        (
            _table(4, 3, scores=np.full((4, 3), np.inf, np.float32)),
            DataValueError,
            r"part-00000\.parquet: scores of query_id 0 has NaN or inf",
        ),
    ],
)
def test_reader_rejects_bad_shards(tmp_path, table, error, message):
    store = create_store(tmp_path / "s", k=3, n_queries=4, n_shards=1, shard_size=4, n_db=10)
    _write_raw_shard(store, 0, table)
    with pytest.raises(error, match=message):
        SimilarityStore(tmp_path / "s").read_shard(0)


def test_non_parquet_shard_and_manifest_mismatches(tmp_path):
    x = _feats(20)
    store = build_topk_store(x, np.arange(20), x, np.arange(20), tmp_path / "s", 3, shard_size=10)
    store.shard_path(0).write_text("not parquet")
    with pytest.raises(CorruptFileError, match=r"part-00000\.parquet: not a readable Parquet file"):
        store.read_shard(0)
    with pytest.raises(ManifestError, match=r"part-00000\.parquet: marked complete in the manifest but"):
        store.validate()
    mpath = tmp_path / "s" / "_manifest.json"
    m = json.loads(mpath.read_text())
    (tmp_path / "s" / "part-00002.parquet").write_bytes(store.shard_path(1).read_bytes())
    with pytest.raises(
        ManifestError, match=r"manifest\.json: directory holds part-00002\.parquet but the manifest lists only 2 shards"
    ):
        SimilarityStore(tmp_path / "s")
    (tmp_path / "s" / "part-00002.parquet").unlink()
    m["shards"] = m["shards"][:1]
    mpath.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="lists 1 shards, but n_shards is 2"):
        SimilarityStore(tmp_path / "s")
    m = json.loads(mpath.read_text())
    m["n_shards"], m["shards"] = (
        2,
        m["shards"] + [{"file": "part-00001.parquet", "first_row": 10, "n_rows": 9, "complete": True}],
    )
    mpath.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"shard 1 \(part-00001\.parquet\): first_row/n_rows 10/9, expected 10/10"):
        SimilarityStore(tmp_path / "s")
    mpath.write_text("{")
    with pytest.raises(CorruptFileError, match=r"manifest\.json: not valid JSON"):
        SimilarityStore(tmp_path / "s")
    with pytest.raises(ManifestError, match="manifest not found"):
        SimilarityStore(tmp_path / "nothing")


# ---- approximate search (faiss IVF) ------------------------------------------------------------


def _clustered(n, d=16, centres=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(store):
    return np.concatenate([s.neighbor_ids for s in store.iter_shards()])


def test_ivf_probing_every_list_is_exact(tmp_path):
    x = _clustered(400)
    spec = topk.TopkSearch(method="ivf", nlist=8, nprobe=8)
    store = build_topk_store(
        x, np.arange(400), x, np.arange(400), tmp_path / "s", 10, shard_size=150, exclude_self=True, search=spec
    )
    ids, scores = _brute(x, x, 10, exclude_diag=True)
    np.testing.assert_array_equal(_ids(store), ids)
    np.testing.assert_allclose(np.concatenate([s.scores for s in store.iter_shards()]), scores, rtol=1e-5, atol=1e-6)
    assert store.manifest["search"] == {"method": "ivf", "nlist": 8, "nprobe": 8, "seed": 0}
    assert (tmp_path / "s" / simstore.IVF_CENTROIDS).is_file()


def test_ivf_recall_and_resume_with_the_same_index(tmp_path):
    x = _clustered(2000, seed=1)
    spec = topk.TopkSearch(method="ivf", nlist=16, nprobe=1)
    args = (x, np.arange(2000), x, np.arange(2000), tmp_path / "s", 20)
    done = []
    store = build_topk_store(*args, shard_size=500, search=spec, progress=lambda d, t: done.append((d, t)))
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)]
    got, (want, _) = _ids(store), _brute(x, x, 20)
    recall = np.mean([len(set(g) & set(w)) / 20 for g, w in zip(got, want)])
    assert 0.85 < recall < 1.0  # approximate, but finds most true neighbours on clustered data
    before = store.read_shard(2).neighbor_ids
    store.shard_path(2).unlink()
    done.clear()
    store = build_topk_store(*args, shard_size=500, search=spec, progress=lambda d, t: done.append((d, t)))
    assert done == [(4, 4)] and store.is_complete()
    np.testing.assert_array_equal(store.read_shard(2).neighbor_ids, before)  # same centroids reused
    with pytest.raises(ManifestError, match="existing store has search=.*'nprobe': 1.*requested .*'nprobe': 4"):
        build_topk_store(*args, shard_size=500, search=topk.TopkSearch(method="ivf", nlist=16, nprobe=4))
    with pytest.raises(ManifestError, match="existing store has search="):
        build_topk_store(*args, shard_size=500)  # exact into an approximate store


def test_ivf_short_lists_fall_back_to_exact(tmp_path):
    x = _feats(400, seed=5)  # no cluster structure: one probed list holds fewer than k items
    spec = topk.TopkSearch(method="ivf", nlist=10, nprobe=1)
    store = build_topk_store(x, np.arange(400), x, np.arange(400), tmp_path / "s", 60, shard_size=400, search=spec)
    got = _ids(store)
    assert got.min() >= 0 and all(len(set(r)) == 60 for r in got)
    s = store.read_shard(0).scores
    assert (np.diff(s, axis=1) <= 1e-6).all()


def test_ivf_bad_settings_and_damaged_centroids(tmp_path):
    with pytest.raises(ValueError, match="search method must be one of"):
        topk.TopkSearch(method="hnsw")
    with pytest.raises(ValueError, match="nprobe >= 1"):
        topk.TopkSearch(method="ivf", nprobe=0)
    x = _clustered(300)
    spec = topk.TopkSearch(method="ivf", nlist=4, nprobe=2)
    store = build_topk_store(x, np.arange(300), x, np.arange(300), tmp_path / "s", 5, shard_size=100, search=spec)
    store.shard_path(0).unlink()
    (tmp_path / "s" / simstore.IVF_CENTROIDS).write_bytes(b"not numpy")
    with pytest.raises(CorruptFileError, match=r"ivf-centroids\.npy: unreadable IVF centroids"):
        build_topk_store(x, np.arange(300), x, np.arange(300), tmp_path / "s", 5, shard_size=100, search=spec)
    assert not store.shard_path(0).exists()


def test_store_reads_as_a_parquet_dataset_and_with_duckdb(tmp_path):
    """The folder is one Parquet dataset: the manifest (``_manifest.json``) is skipped, lists
    have the fixed size K, and the file metadata names K and the method."""
    import duckdb
    import pyarrow.dataset as ds

    q, db = _feats(30, seed=1), _feats(80, seed=2)
    store = build_topk_store(q, np.arange(30) + 500, db, np.arange(80), tmp_path / "s", 7, shard_size=12)
    table = ds.dataset(tmp_path / "s", format="parquet").to_table()
    assert table.num_rows == 30 and table.schema.field("neighbor_ids").type == pa.list_(pa.int64(), 7)
    assert table.schema.field("scores").type == pa.list_(pa.float32(), 7)
    assert pq.read_table(tmp_path / "s").num_rows == 30
    meta = pq.read_schema(tmp_path / "s" / "part-00000.parquet").metadata
    assert meta[b"ssr.k"] == b"7" and meta[b"ssr.method"] == store.method.encode() == b"top-k exact"
    ids, _ = _brute(q, db, 7)
    rows = duckdb.sql(
        f"SELECT query_id, neighbor_ids FROM read_parquet('{tmp_path / 's'}/*.parquet') ORDER BY query_id"
    ).fetchall()
    assert [r[0] for r in rows] == list(range(500, 530))
    np.testing.assert_array_equal(np.array([r[1] for r in rows]), ids)


def test_version_1_store_is_still_read(tmp_path):
    """A store written before fixed-size lists, with ``manifest.json``: opened, its manifest
    renamed, its variable-length lists read."""
    q, db = _feats(10, seed=1), _feats(40, seed=2)
    build_topk_store(q, np.arange(10), db, np.arange(40), tmp_path / "s", 5, shard_size=10)
    path = tmp_path / "s" / "part-00000.parquet"
    table = pq.read_table(path)
    offsets = pa.array(np.arange(0, 10 * 5 + 1, 5, dtype=np.int32))
    old = pa.table(
        {
            "query_id": table["query_id"],
            **{
                c: pa.ListArray.from_arrays(offsets, table[c].combine_chunks().flatten())
                for c in ("neighbor_ids", "scores")
            },
        }
    )
    pq.write_table(old, path)
    (tmp_path / "s" / "_manifest.json").rename(tmp_path / "s" / "manifest.json")
    store = SimilarityStore(tmp_path / "s")
    assert (tmp_path / "s" / "_manifest.json").is_file() and not (tmp_path / "s" / "manifest.json").exists()
    np.testing.assert_array_equal(store.read_shard(0).neighbor_ids, _brute(q, db, 5)[0])
