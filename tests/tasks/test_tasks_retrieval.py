"""Retrieval plain code: training sequences, training/resume, rankings and re-ranked orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssr_model.baselines import KReciprocalPoint, krecip_grid
from ssr_model.metrics import revisited_map
from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.retrieval.evaluate import (
    BaselineChoice,
    choose_baselines,
    method_rankings,
    ranks_after_rerank,
    write_ranking_store,
)
from ssr_tasks.retrieval.train import (
    ValidationSet,
    draw_sequences,
    period_sequences,
    topk_ap,
    train_retrieval,
    validation_map,
)
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


def test_sequences_are_uniform_draws_that_pass_the_filter():
    emb, labels = clusters(n_clusters=10, per=30, noise=2.0)
    seqs = draw_sequences(emb, labels, k=10, sequence_length=100, n=50, seed=0, min_positives=3, max_ap=0.8)
    assert len(seqs) == 50 and seqs.neighbours.shape == (50, 10)
    assert (seqs.positives.sum(1) > 3).all() and (topk_ap(seqs.positives) < 0.8).all()
    assert (labels[seqs.neighbours] == labels[seqs.query][:, None]).tolist() == seqs.positives.tolist()
    assert not (seqs.neighbours == seqs.query[:, None]).any()
    # the neighbours are each sequence's best items by the initial score, best first
    scores = np.einsum("sd,skd->sk", emb[seqs.query], emb[seqs.neighbours])
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # seeded: the same seed draws the same sequences, another seed others
    again = draw_sequences(emb, labels, k=10, sequence_length=100, n=50, seed=0, min_positives=3, max_ap=0.8)
    assert np.array_equal(again.neighbours, seqs.neighbours)
    other = draw_sequences(emb, labels, k=10, sequence_length=100, n=50, seed=1, min_positives=3, max_ap=0.8)
    assert not np.array_equal(other.query, seqs.query)
    # uniform over the whole set: with a filter that keeps everything, every item is drawn as a
    # query about as often, and a sequence holds the query's cluster in proportion (29/299 of 100)
    all_kept = draw_sequences(emb, labels, k=100, sequence_length=100, n=3000, seed=2, min_positives=0, max_ap=1.01)
    counts = np.bincount(all_kept.query, minlength=len(emb))
    assert counts.min() >= 1 and counts.max() <= 30
    assert all_kept.positives.sum(1).mean() == pytest.approx(100 * 29 / 299, rel=0.05)
    with pytest.raises(ValueError, match=r"only 0 of 5 passed the filter \(more than 40 positives"):
        draw_sequences(emb, labels, k=10, sequence_length=100, n=5, seed=0, min_positives=40, max_draws=200)


def _validation(emb, labels, n_queries=12):
    return ValidationSet.from_clusters(emb, labels, n_queries, seed=0)


def test_validation_map_is_the_revisited_map_of_the_reranked_top_k():
    emb, labels = clusters(n_clusters=8, per=8)
    val = _validation(emb, labels)
    assert len(val.queries) == 12 and len(val.database) == 64 - 12
    model = RetrievalTrainParams(k=10, hidden=16, lr_dni=0.1).build(16)
    got = validation_map(model, val, "cpu")
    with torch.no_grad():
        refined = model(torch.from_numpy(val.queries), torch.from_numpy(val.database[val.initial[:, :10]]))
    ranks = val.initial.copy()
    ranks[:, :10] = np.take_along_axis(val.initial[:, :10], refined.argsort(dim=-1, descending=True).numpy(), axis=1)
    assert got == pytest.approx(revisited_map(ranks, val.gnd)["medium"]["map"] / 100)


def test_training_resumes_to_the_same_model(tmp_path):
    emb, labels = clusters(n_clusters=10, per=30, noise=2.0)
    held = clusters(n_clusters=4, per=8, noise=2.0, seed=5)
    val = _validation(*held)
    cfg = RetrievalTrainParams(
        k=10,
        hidden=16,
        lr_dni=0.1,
        iterations=6,
        val_every=2,
        batch_queries=4,
        lr=0.05,
        sequence_length=100,
        min_positives=3,
    )
    clean = train_retrieval(cfg, emb, labels, val, tmp_path / "clean")
    assert [h["iteration"] for h in clean["history"]] == [0, 2, 4, 6]
    assert clean["best_val"] == max(h["val_map"] for h in clean["history"])
    assert any(
        h["iteration"] == clean["best_iteration"] and h["val_map"] == clean["best_val"] for h in clean["history"]
    )

    def crash(row, state={"n": 0}):  # noqa: B006 - the default is the state kept across calls
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_retrieval(cfg, emb, labels, val, tmp_path / "resumed", report=crash)
    resumed = train_retrieval(cfg, emb, labels, val, tmp_path / "resumed")
    assert resumed["best_val"] == pytest.approx(clean["best_val"])
    a, b = torch.load(clean["best_path"], weights_only=True), torch.load(resumed["best_path"], weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_each_validation_period_draws_fresh_sequences():
    emb, labels = clusters(n_clusters=10, per=30, noise=2.0)
    cfg = RetrievalTrainParams(k=10, val_every=5, batch_queries=2, sequence_length=100, min_positives=3)
    first, second = (period_sequences(cfg, emb, labels, p) for p in (0, 1))
    assert len(first) == len(second) == 10 and not np.array_equal(first.query, second.query)
    assert np.array_equal(period_sequences(cfg, emb, labels, 1).neighbours, second.neighbours)


def test_baselines_are_chosen_on_validation():
    emb, labels = clusters(n_clusters=8, per=10, noise=1.5)
    val = _validation(emb, labels, n_queries=16)
    points = krecip_grid([(5, 3), (10, 5)], [0.3, 0.8])
    choice = choose_baselines(val, [1, 3], points)
    tried = dict(choice.val_map)
    # QE 4 x 2, k-reciprocal 4, alpha-DBA-QE 4 x 2, diffusion 3, GNN 3, SuperGlobal 3 x 2
    assert len(tried) == 4 * 2 + 4 + 8 + 3 + 3 + 6
    for name, n in choice.qe_n:
        assert tried[f"{name} n={n}"] == max(tried[f"{name} n={m}"] for m in (1, 3))
    assert tried[f"k-reciprocal {choice.krecip.label()}"] == max(tried[f"k-reciprocal {p.label()}"] for p in points)
    for name, point in choice.shortlist:
        assert tried[f"{name} {point.label()}"] == max(v for k, v in tried.items() if k.startswith(f"{name} "))
    assert set(choice.as_params()) == {
        "chosen.qe_n.AQE",
        "chosen.qe_n.AQEwD",
        "chosen.qe_n.alpha-QE",
        "chosen.qe_n.DQE",
        "chosen.krecip",
        "chosen.alpha-DBA-QE",
        "chosen.diffusion",
        "chosen.GNN",
        "chosen.SuperGlobal",
    }


def test_methods_pick_the_rows_and_only_their_settings_are_chosen():
    emb, labels = clusters(n_clusters=8, per=10, noise=1.5)
    val = _validation(emb, labels, n_queries=16)
    choice = choose_baselines(val, [1, 3], krecip_grid([(5, 3)], [0.3]), methods=["SuperGlobal", "features", "AQE"])
    assert choice.methods == ("features", "AQE", "SuperGlobal") and choice.krecip is None
    assert {k.split(" ")[0] for k, _ in choice.val_map} == {"AQE", "SuperGlobal"}
    assert choice.as_params()["chosen.methods"] == "features,AQE,SuperGlobal"
    q, db = emb[:5], emb[5:]
    assert [m.name for m in method_rankings(q, db, choice)] == ["features", "AQE", "SuperGlobal"]
    with pytest.raises(ValueError, match="methods: unknown method 'CSA'"):
        choose_baselines(val, [1], [], methods=["CSA"])


def test_shortlist_methods_rerank_only_their_shortlist():
    emb, _ = clusters(n_clusters=60, per=8)
    q, db = emb[:6], emb[6:]  # N = 474 > GNN's and SuperGlobal's 400
    choice = BaselineChoice((), None, (), methods=("features", "GNN", "SuperGlobal", "diffusion", "alpha-DBA-QE"))
    methods = {m.name: m for m in method_rankings(q, db, choice)}
    base = methods["features"]
    for name in ("GNN", "SuperGlobal"):
        m = methods[name]
        assert (np.sort(m.ranks[:, :400], 1) == np.sort(base.ranks[:, :400], 1)).all()
        assert (m.ranks[:, 400:] == base.ranks[:, 400:]).all()
        assert (np.diff(m.scores, axis=1) <= 1e-6).all()
    assert np.allclose(methods["GNN"].query, base.query) and not np.allclose(methods["SuperGlobal"].query, base.query)
    assert np.allclose(np.linalg.norm(methods["alpha-DBA-QE"].query, axis=1), 1, atol=1e-5)


def test_method_rankings_and_rerank_order(tmp_path):
    emb, _ = clusters(n_clusters=10, per=6)
    q, db = emb[:5], emb[5:]
    choice = BaselineChoice((("AQE", 2), ("AQEwD", 2), ("alpha-QE", 2), ("DQE", 2)), KReciprocalPoint(20, 6, 0.3), ())
    methods = method_rankings(q, db, choice)
    assert [m.name for m in methods] == [
        "features",
        "AQE",
        "AQEwD",
        "alpha-QE",
        "DQE",
        "k-reciprocal",
        "alpha-DBA-QE",
        "diffusion",
        "GNN",
        "SuperGlobal",
    ]
    for m in methods:
        assert m.ranks.shape == (5, len(db))
        assert (np.sort(m.ranks, 1) == np.arange(len(db))).all()
    m = methods[0]
    store = write_ranking_store(tmp_path / "s", m, k_store=4, shard_size=2, source="t")
    assert store.is_complete() and store.n_shards == 3
    # reversing the stored top-4 must reverse exactly those 4 and keep the rest
    out = create_store(tmp_path / "r", 4, 5, 3, 2)
    for shard in store.iter_shards():
        out.mark_complete(
            shard.index, out.write_shard(shard.index, shard.query_ids, shard.neighbor_ids[:, ::-1].copy(), shard.scores)
        )
    ranks = ranks_after_rerank(tmp_path / "r", m.ranks)
    assert (ranks[:, :4] == m.ranks[:, :4][:, ::-1]).all() and (ranks[:, 4:] == m.ranks[:, 4:]).all()
