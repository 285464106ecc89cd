"""The re-rankers' candidate searches on the Ray actor pool give what the in-process search gives."""

import numpy as np

from ssr_model.baselines import KReciprocalPoint
from ssr_model.baselines.neighbours import LocalSearch
from ssr_tasks.retrieval.evaluate import BaselineChoice, method_rankings
from ssr_tasks.retrieval.ray_jobs import CandidateSearcher, CandidateSearchPool
from storage.features import write_features


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_searcher_reads_an_array_a_table_or_a_npy_alike(tmp_path):
    rng = np.random.default_rng(0)
    db, feats = _unit(rng.standard_normal((300, 8))), _unit(rng.standard_normal((9, 8)))
    table = write_features(
        tmp_path / "db.parquet",
        ids=np.arange(300),
        labels=np.zeros(300, int),
        splits="database",
        embeddings=3 * db,  # the table's rows are normalised as they are read
        metadata={"dataset": "d", "backbone": "b", "checkpoint_hash": "h"},
    )
    np.save(tmp_path / "db.npy", db)  # the pipeline's database.npy: unit rows, memory-mapped
    ref = LocalSearch(db, db_block=64)
    for source in (db, str(table), str(tmp_path / "db.npy")):
        s = CandidateSearcher(source, db_block=64)
        for got, want in ((s.top(feats, 5), ref.top(feats, 5)), (s.lowest(feats, 3), ref.lowest(feats, 3))):
            assert got[0].tolist() == want[0].tolist()
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_pool_rankings_equal_the_local_ones(ray_local):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((12, 16))
    emb = _unit(np.repeat(centres, 6, axis=0) + 0.8 * rng.standard_normal((72, 16)))
    q, db = emb[:6], emb[6:]
    choice = BaselineChoice(
        (("DQE", 2),), KReciprocalPoint(5, 3, 0.3), (), methods=("features", "DQE", "k-reciprocal", "diffusion")
    )
    local = method_rankings(q, db, choice)
    with CandidateSearchPool(3 * db, n_actors=2, rows_per_task=16) as pool:  # the pool normalises
        pooled = method_rankings(q, db, choice, search=pool)
    for a, b in zip(local, pooled):
        assert a.name == b.name and a.ranks.tolist() == b.ranks.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_candidate_search_picks_the_pool_by_n_search_actors(ray_local):
    from ssr_tasks.retrieval.ray_jobs import candidate_search

    rng = np.random.default_rng(2)
    db, feats = _unit(rng.standard_normal((200, 8))), _unit(rng.standard_normal((5, 8)))
    with candidate_search(db, -1) as search:  # one local node: the in-process search
        assert search is None
    with candidate_search(db, 1) as search:
        assert isinstance(search, CandidateSearchPool) and len(search.actors) == 1
        got, want = search.top(feats, 4), LocalSearch(db).top(feats, 4)
        assert got[0].tolist() == want[0].tolist()
    assert search.actors == []  # closed on exit
