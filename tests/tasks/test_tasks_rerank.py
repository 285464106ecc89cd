"""Re-ranking stores: the plain worker, then the Ray actor pool on real Parquet shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.retrieval.handoffs import RetrievalModel
from ssr_tasks.retrieval.rerank import ShardReranker, rerank_store
from storage.features import write_features
from storage.simstore import SimilarityStore, build_topk_store

D, K_STORE, K = 12, 10, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    rng = np.random.default_rng(0)
    db = rng.normal(size=(80, D)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.normal(size=(25, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    meta = {"dataset": "t", "backbone": "t", "checkpoint_hash": "-", "dim": str(D)}
    write_features(
        root / "db.parquet",
        ids=np.arange(80),
        labels=["db"] * 80,
        splits=["database"] * 80,
        embeddings=db,
        metadata=meta,
    )
    write_features(
        root / "q.parquet", ids=np.arange(25), labels=["q"] * 25, splits=["query"] * 25, embeddings=q, metadata=meta
    )
    build_topk_store(q, np.arange(25), db, np.arange(80), root / "topk", K_STORE, shard_size=7)
    torch.manual_seed(0)
    cfg = RetrievalTrainParams(k=K, steps=1, lr_dni=0.5, hidden=16)
    torch.save(cfg.build(D).state_dict(), root / "model.pt")
    return root, RetrievalModel(str(root / "model.pt"), cfg, D), q


def expected(root, model, q):
    worker = ShardReranker(str(root / "db.parquet"), model)
    rows = []
    for shard in SimilarityStore(root / "topk").iter_shards():
        ids, _ = worker.rerank_arrays(torch.from_numpy(q[shard.query_ids]), shard.neighbor_ids, shard.scores)
        rows.append((shard.query_ids, ids))
    return rows


def test_plain_worker_reorders_only_the_top_k(setup):
    root, model, q = setup
    for (_qids, ids), shard in zip(expected(root, model, q), SimilarityStore(root / "topk").iter_shards()):
        assert np.array_equal(np.sort(ids[:, :K], 1), np.sort(shard.neighbor_ids[:, :K], 1))
        assert np.array_equal(ids[:, K:], shard.neighbor_ids[:, K:])


def test_actor_pool_reranks_every_query_exactly_once(setup, ray_local):
    root, model, q = setup
    out = rerank_store(root / "topk", root / "q.parquet", root / "db.parquet", root / "reranked", model, n_actors=2)
    store = SimilarityStore(out)
    assert store.is_complete() and store.k == K_STORE
    got = {int(qid): ids for shard in store.iter_shards() for qid, ids in zip(shard.query_ids, shard.neighbor_ids)}
    assert sorted(got) == list(range(25))
    for qids, ids in expected(root, model, q):
        for qid, row in zip(qids, ids):
            assert np.array_equal(got[int(qid)], row)
    # a deleted output shard is redone on rerun, the others are kept
    store.shard_path(1).unlink()
    rerank_store(root / "topk", root / "q.parquet", root / "db.parquet", root / "reranked", model, n_actors=1)
    assert SimilarityStore(out).is_complete()


def test_any_unique_database_ids(setup, tmp_path):
    """A database table with ids that are not its rows (shuffled, with gaps): the store holds
    those ids, the worker finds each one's row."""
    root, model, q = setup
    from storage.features import read_features

    db = read_features(root / "db.parquet")
    perm = np.random.default_rng(1).permutation(len(db))
    ids = 1000 + 3 * np.arange(len(db))  # id of row r before the shuffle
    write_features(
        tmp_path / "db.parquet",
        ids=ids[perm],
        labels=["db"] * len(db),
        splits="database",
        embeddings=db.embeddings[perm],
        metadata=db.metadata,
    )
    build_topk_store(q, np.arange(25), db.embeddings, ids, tmp_path / "topk", K_STORE, shard_size=7)
    worker = ShardReranker(str(tmp_path / "db.parquet"), model)
    plain = {int(i): row for qids, rows in expected(root, model, q) for i, row in zip(qids, rows)}
    for shard in SimilarityStore(tmp_path / "topk").iter_shards():
        got, _ = worker.rerank_arrays(torch.from_numpy(q[shard.query_ids]), shard.neighbor_ids, shard.scores)
        for qid, row in zip(shard.query_ids, got):
            assert np.array_equal(row, ids[plain[int(qid)]])
    store = SimilarityStore(tmp_path / "topk")
    bad = store.read_shard(0).neighbor_ids.copy()
    bad[0, 0] = 7  # not an id of the table
    with pytest.raises(ValueError, match=r"db\.parquet: neighbour id 7 of the store is not in the database table"):
        worker.rerank_arrays(torch.from_numpy(q[:1]), bad[:1], np.zeros_like(bad[:1], np.float32))
