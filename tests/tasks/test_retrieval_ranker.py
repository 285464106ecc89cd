"""The ranking step (``ssr_tasks.retrieval.ranker``): the database written once as a memory-mapped
.npy, every row computed once and written as it is made, its cost measured on that call, resumable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ssr_model.baselines import KReciprocalPoint
from ssr_tasks.retrieval.evaluate import BaselineChoice, RankingSession, method_rankings, read_ranks
from ssr_tasks.retrieval.handoffs import RetrievalFeatures
from ssr_tasks.retrieval.ranker import (
    MethodRanker,
    StageCost,
    compose,
    rank_in_actor,
    write_database_npy,
)
from ssr_tasks.retrieval.rerank import ShardReranker
from storage.features import write_features
from storage.simstore import SimilarityStore

META = {"dataset": "d", "backbone": "b", "checkpoint_hash": "h"}
CHOICE = BaselineChoice(
    (("AQE", 2), ("DQE", 2)),
    KReciprocalPoint(6, 3, 0.3),
    (),
    methods=("features", "AQE", "DQE", "k-reciprocal", "diffusion", "SuperGlobal"),
)


@pytest.fixture
def table(tmp_path):
    """A test features table: 90 database rows (not unit length), then 7 queries, splits interleaved."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((15, 12))
    emb = np.repeat(centres, 7, axis=0)[:97] + 0.7 * rng.standard_normal((97, 12))
    emb *= rng.uniform(0.5, 3.0, (97, 1))
    splits = np.array(["database"] * 97, dtype=object)
    splits[[3, 20, 41, 55, 70, 88, 96]] = "query"  # the queries sit between database rows in the table
    path = write_features(
        tmp_path / "features.parquet",
        ids=np.arange(97),
        labels=np.zeros(97, int),
        splits=splits,
        embeddings=emb.astype(np.float32),
        metadata=META,
    )
    return path, emb.astype(np.float32), splits


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def test_database_npy_is_the_unit_database_rows_in_table_order(table, tmp_path):
    path, emb, splits = table
    out = write_database_npy(path, tmp_path / "database.npy", 90, 12, block_rows=16)
    got = np.load(out, mmap_mode="r")
    np.testing.assert_allclose(got, _unit(emb[splits == "database"]), rtol=1e-6)
    assert write_database_npy(path, out, 90, 12) == out  # kept
    with pytest.raises(ValueError, match=r"database.npy: database of shape \(90, 12\) float32, expected \(91, 12\)"):
        write_database_npy(path, out, 91, 12)
    # a failed write leaves nothing under the final name, nor a temporary file
    with pytest.raises(ValueError, match="split 'database' has 90 rows, expected 95"):
        write_database_npy(path, tmp_path / "other.npy", 95, 12, block_rows=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["database.npy", "features.parquet"]


def test_stage_costs_add_up_and_the_peak_counts_what_earlier_stages_hold():
    mib = 2**20
    stages = [
        StageCost(1.0, 0.5, 100 * mib, 40 * mib),
        StageCost(2.0, 2.0, 80 * mib, 0),
        StageCost(0.5, 0.5, 10 * mib, 0),
    ]
    c = compose("m", stages, n_queries=10)
    assert c.ms_per_query == pytest.approx(350.0) and c.cpu_seconds == pytest.approx(3.0)
    assert c.peak_mib == pytest.approx(120.0)  # 40 held by the first stage + the second's 80
    assert compose("m", stages[:1], 10).peak_mib == pytest.approx(100.0)


def test_ranker_rows_equal_method_rankings_and_a_rerun_resumes(table, tmp_path):
    path, emb, splits = table
    db = write_database_npy(path, tmp_path / "database.npy", 90, 12)
    ranker = MethodRanker(str(path), str(db), 12, threads=None)
    stores = tmp_path / "stores"
    rows = ranker.rank(CHOICE, str(stores), k_store=20, shard_size=3)
    want = method_rankings(emb[splits == "query"], emb[splits == "database"], CHOICE)
    assert [r.store.name for r in rows] == list(CHOICE.methods)
    for r, m in zip(rows, want):
        ranks = read_ranks(stores / "ranks", m.name)
        assert ranks.dtype == np.int32 and ranks.tolist() == m.ranks.tolist()
        top = np.concatenate([s.neighbor_ids for s in SimilarityStore(r.store.topk).iter_shards()])
        assert top.tolist() == m.ranks[:, :20].tolist()
        assert r.cost.n_queries == 7 and r.cost.ms_per_query > 0 and r.cost.peak_mib > 0
    costs = {r.store.name: r.cost for r in rows}
    # the shortlist rows are charged the candidate search they share
    assert costs["diffusion"].cpu_seconds >= costs["features"].cpu_seconds
    # a rerun reads every row back; a row whose cost file is missing is recomputed, alone
    stamp = {p: p.stat().st_mtime_ns for p in stores.rglob("*") if p.is_file()}
    again = ranker.rank(CHOICE, str(stores), k_store=20, shard_size=3)
    assert [r.cost for r in again] == [r.cost for r in rows]
    assert {p: p.stat().st_mtime_ns for p in stores.rglob("*") if p.is_file()} == stamp
    os.unlink(stores / "AQE" / "cost.json")
    ranker.rank(CHOICE, str(stores), k_store=20, shard_size=3)
    changed = {p.relative_to(stores).as_posix() for p in stamp if p.exists() and p.stat().st_mtime_ns != stamp[p]}
    assert changed == {"ranks/AQE.npy", "queries-AQE.parquet", "AQE/cost.json"}  # its complete store is kept
    assert json.loads((stores / "AQE" / "cost.json").read_text())["name"] == "AQE"


def test_session_computes_shared_stages_once(table):
    _, emb, splits = table
    s = RankingSession(emb[splits == "query"], emb[splits == "database"], CHOICE)
    first = s.initial()
    assert s.initial() is first and s.neighbours() is s.neighbours()
    assert s.method("features").ranks is first[0]
    with pytest.raises(ValueError, match="methods: unknown method 'CSA'"):
        s.method("CSA")


def test_ranking_actor_and_the_npy_reranker(table, tmp_path, ray_local):
    path, emb, splits = table
    db = write_database_npy(path, tmp_path / "database.npy", 90, 12)
    features = RetrievalFeatures(str(path), 12, 90, 7, str(path))
    rows, test = rank_in_actor(features, str(db), CHOICE, str(tmp_path / "stores"), 20, 3)
    assert test is None and [r.store.name for r in rows] == list(CHOICE.methods)
    assert read_ranks(tmp_path / "stores" / "ranks", "k-reciprocal").shape == (7, 90)


def test_reranker_reads_the_npy_database_as_the_table(table, tmp_path):
    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.retrieval.handoffs import RetrievalModel
    from storage.checkpoints import save_checkpoint

    path, emb, splits = table
    db_rows = emb[splits == "database"]
    npy = write_database_npy(path, tmp_path / "database.npy", 90, 12)
    parquet = write_features(
        tmp_path / "db.parquet",
        ids=np.arange(90),
        labels=np.zeros(90, int),
        splits="database",
        embeddings=db_rows,
        metadata=META,
    )
    cfg = RetrievalTrainParams(k=5, hidden=8)
    weights = tmp_path / "w.pt"
    save_checkpoint(weights, cfg.build(12).state_dict())
    model = RetrievalModel(str(weights), cfg, 12)
    a, b = ShardReranker(str(npy), model), ShardReranker(str(parquet), model)
    import torch

    q = torch.nn.functional.normalize(torch.from_numpy(emb[splits == "query"]), dim=-1)
    ids = np.argsort(-(q.numpy() @ _unit(db_rows).T), axis=1)[:, :9]
    scores = np.zeros(ids.shape, np.float32)
    ia, sa = a.rerank_arrays(q, ids, scores)
    ib, sb = b.rerank_arrays(q, ids, scores)
    assert ia.tolist() == ib.tolist()
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"database.npy: database of shape \(90, 12\), expected \(N, 7\)"):
        ShardReranker(str(npy), RetrievalModel(str(weights), cfg, 7))


def test_ssr_cost_probe_on_a_store_over_the_npy_database(table, tmp_path):
    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.retrieval.costs import measure_ssr
    from ssr_tasks.retrieval.handoffs import RetrievalModel
    from storage.checkpoints import save_checkpoint

    path, _, _ = table
    db = write_database_npy(path, tmp_path / "database.npy", 90, 12)
    (row,) = MethodRanker(str(path), str(db), 12, threads=None).rank(
        BaselineChoice((), None, (), methods=("features",)), str(tmp_path / "stores"), 20, 3
    )
    cfg = RetrievalTrainParams(k=5, hidden=8)
    save_checkpoint(tmp_path / "w.pt", cfg.build(12).state_dict())
    (cost,) = measure_ssr(
        [("features", row.store.topk, row.store.queries)], RetrievalModel(str(tmp_path / "w.pt"), cfg, 12), str(db)
    )
    assert cost.name == "features + SSR" and cost.n_queries == 7 and cost.ms_per_query > 0 and cost.peak_mib > 0
