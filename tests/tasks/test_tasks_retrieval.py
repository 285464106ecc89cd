"""Retrieval plain code: training sequences, training/resume, rankings and re-ranked orders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_tasks.retrieval.evaluate import method_rankings, ranks_after_rerank, write_ranking_store
from ssr_tasks.retrieval.train import RetrievalTrainConfig, make_sequences, topk_ap, train_retrieval
from storage.simstore import create_store


def clusters(n_clusters=30, per=8, dim=16, noise=1.2, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    emb = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_clusters * per, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), np.repeat(np.arange(n_clusters), per)


def test_topk_ap_hand_computed():
    # positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert topk_ap(np.array([[True, False, True, False]]))[0] == pytest.approx((1 + 2 / 3) / 2)


def test_sequences_respect_the_filter():
    emb, labels = clusters()
    seqs = make_sequences(emb, labels, k=10, sequence_length=100, n=50, seed=0, min_pos=3, max_ap=0.8)
    assert len(seqs) > 0 and seqs.neighbours.shape[1] == 10
    assert (seqs.positives.sum(1) >= 3).all() and (topk_ap(seqs.positives) < 0.8).all()
    assert (labels[seqs.neighbours] == labels[seqs.query][:, None]).tolist() == seqs.positives.tolist()
    assert not (seqs.neighbours == seqs.query[:, None]).any()
    with pytest.raises(ValueError, match="no training sequence passed the filter"):
        make_sequences(emb, labels, k=10, sequence_length=100, n=5, seed=0, min_pos=9)


def test_training_resumes_to_the_same_model(tmp_path):
    emb, labels = clusters()
    tr = make_sequences(emb, labels, k=10, sequence_length=100, n=40, seed=0, min_pos=3)
    va = make_sequences(emb, labels, k=10, sequence_length=100, n=10, seed=1, min_pos=3)
    cfg = RetrievalTrainConfig(feat_dim=16, k=10, hidden=16, lr_dni=0.1, iterations=6, val_every=2, batch_queries=4, lr=0.05)
    clean = train_retrieval(cfg, emb, tr, va, tmp_path / "clean")

    def crash(row, state={"n": 0}):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_retrieval(cfg, emb, tr, va, tmp_path / "resumed", report=crash)
    resumed = train_retrieval(cfg, emb, tr, va, tmp_path / "resumed")
    assert resumed["best_val"] == pytest.approx(clean["best_val"])
    a, b = torch.load(clean["best_path"], weights_only=True), torch.load(resumed["best_path"], weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_method_rankings_and_rerank_order(tmp_path):
    emb, _ = clusters(n_clusters=10, per=6)
    q, db = emb[:5], emb[5:]
    methods = method_rankings(q, db, qe_n=2)
    assert [m.name for m in methods] == ["features", "AQE", "AQEwD", "alpha-QE", "DQE", "k-reciprocal"]
    for m in methods:
        assert m.ranks.shape == (5, len(db))
        assert (np.sort(m.ranks, 1) == np.arange(len(db))).all()
    m = methods[0]
    store = write_ranking_store(tmp_path / "s", m, k_store=4, shard_size=2, source="t")
    assert store.is_complete() and store.n_shards == 3
    # reversing the stored top-4 must reverse exactly those 4 and keep the rest
    out = create_store(tmp_path / "r", 4, 5, 3, 2)
    for shard in store.iter_shards():
        out.mark_complete(shard.index, out.write_shard(shard.index, shard.query_ids, shard.neighbor_ids[:, ::-1].copy(), shard.scores))
    ranks = ranks_after_rerank(tmp_path / "r", m.ranks)
    assert (ranks[:, :4] == m.ranks[:, :4][:, ::-1]).all() and (ranks[:, 4:] == m.ranks[:, 4:]).all()
