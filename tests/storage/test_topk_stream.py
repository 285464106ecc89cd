"""The similarity store builder streams the database table block by block (iter_embeddings)."""

import numpy as np
import pytest

from storage.errors import DataValueError, SchemaError
from storage.features import iter_embeddings, read_ids, write_features
from storage.simstore import build_topk_store, build_topk_store_from_tables

META = {"dataset": "d", "backbone": "b", "checkpoint_hash": "h"}


def _tables(tmp_path, n_db=50, n_q=6, D=5):
    rng = np.random.default_rng(0)
    xdb, xq = rng.standard_normal((n_db, D)).astype(np.float32), rng.standard_normal((n_q, D)).astype(np.float32)
    splits = np.where(np.arange(n_db) % 3 == 0, "other", "database")
    db = write_features(
        tmp_path / "db.parquet",
        ids=np.arange(100, 100 + n_db),
        labels=np.zeros(n_db, int),
        splits=splits,
        embeddings=xdb,
        metadata=META,
    )
    q = write_features(
        tmp_path / "q.parquet",
        ids=np.arange(n_q),
        labels=np.zeros(n_q, int),
        splits="query",
        embeddings=xq,
        metadata=META,
    )
    return db, q, xdb, xq, splits


def test_iter_embeddings_blocks_split_and_normalise(tmp_path):
    db, _, xdb, _, splits = _tables(tmp_path)
    blocks = list(iter_embeddings(db, 7, split="database", normalise=True))
    ids = np.concatenate([i for i, _ in blocks])
    emb = np.concatenate([e for _, e in blocks])
    keep = splits == "database"
    assert ids.tolist() == (np.arange(100, 150)[keep]).tolist() == read_ids(db, split="database").tolist()
    np.testing.assert_allclose(emb, xdb[keep] / np.linalg.norm(xdb[keep], axis=1, keepdims=True), rtol=1e-6)
    assert max(len(i) for i, _ in blocks) <= 7
    with pytest.raises(DataValueError, match="db.parquet: no rows with split 'test'"):
        read_ids(db, split="test")


def test_streamed_store_equals_the_in_memory_one(tmp_path):
    db, q, xdb, xq, splits = _tables(tmp_path)
    keep = splits == "database"

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    streamed = build_topk_store_from_tables(q, db, tmp_path / "s", 5, database_split="database")
    ref = build_topk_store(unit(xq), np.arange(6), unit(xdb[keep]), np.arange(100, 150)[keep], tmp_path / "r", 5)
    a, b = streamed.read_shard(0), ref.read_shard(0)
    assert a.neighbor_ids.tolist() == b.neighbor_ids.tolist()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


def test_streamed_store_refuses_another_dim(tmp_path):
    db, _, _, _, _ = _tables(tmp_path)
    q = write_features(
        tmp_path / "q3.parquet", ids=[0], labels=[0], splits="query", embeddings=np.ones((1, 3)), metadata=META
    )
    with pytest.raises(SchemaError, match=r"db.parquet: embedding has dim 5, expected 3"):
        build_topk_store_from_tables(q, db, tmp_path / "s", 2)


def test_topk_search_reports_each_querys_lowest_score_in_the_same_pass():
    from storage.topk import row_blocks, topk_search

    rng = np.random.default_rng(2)
    q, db = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((37, 6)).astype(np.float32)
    low = np.full(4, np.inf, np.float32)
    ids, _ = topk_search(q, row_blocks(db, 5), 3, lowest=low)
    np.testing.assert_allclose(low, (q @ db.T).min(axis=1), rtol=1e-6)
    assert ids.tolist() == np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :3].tolist()
