"""Validation that mirrors the test set (issue 20 item 6): hand-checked on tiny labelled sets."""

from __future__ import annotations

import numpy as np
import pytest

from ssr_model.baselines import KReciprocalPoint, ShortlistPoint
from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams
from ssr_tasks.retrieval.evaluate import BaselineChoice
from ssr_tasks.retrieval.settings import (
    mirrored_database_size,
    positives_scale,
    protocol_profile,
    scaled_krecip,
    scaled_point,
    scaled_qe_n,
    scaled_shortlist,
)
from ssr_tasks.retrieval.train import ValidationSet, distractor_rows, load_validation
from ssr_tasks.retrieval.validation import (
    Grids,
    choose_on_validation,
    to_test_grid,
    val_vs_test_rows,
    val_vs_test_summary,
)
from storage.features import write_features
from storage.landmark_tables import validation_ground_truth


def test_spread_queries_take_one_per_cluster_before_a_second():
    clusters = np.repeat(np.arange(5), 6)  # 5 clusters of 6
    q, db, gt = validation_ground_truth(clusters, 5, seed=3, spread=True)
    assert sorted(clusters[q].tolist()) == [0, 1, 2, 3, 4]  # one each
    assert [len(g["easy"]) for g in gt.gnd] == [5] * 5 and len(db) == 25
    q7, _, gt7 = validation_ground_truth(clusters, 7, seed=3, spread=True)
    assert np.bincount(clusters[q7], minlength=5).max() == 2 and len(q7) == 7
    # the old draw is unchanged without spread
    a = validation_ground_truth(clusters, 7, seed=3)
    b = validation_ground_truth(clusters, 7, seed=3, spread=False)
    assert np.array_equal(a[0], b[0])


def test_profile_and_mirrored_size_by_hand():
    gnd = [
        {"easy": [0, 1], "hard": [2, 3, 4, 5], "junk": [6]},
        {"easy": [7, 8, 9, 10], "hard": [11, 12], "junk": []},
    ]
    test = protocol_profile("test", gnd, 600)
    assert (test.easy, test.hard, test.junk, test.positives) == (3.0, 3.0, 0.5, 6.0)
    row = test.row((60,))
    assert row["positives per 1k db"] == 10.0 and row["k1=60: % of db"] == 10.0 and row["k1=60 / positives"] == 10.0
    # 2 positives per validation query: 2 * 600 / 6 = 200 items, between the held-out items and all available
    assert mirrored_database_size(2.0, 50, 1000, test) == 200
    assert mirrored_database_size(2.0, 300, 1000, test) == 300  # never fewer than the held-out items
    assert mirrored_database_size(2.0, 50, 120, test) == 120  # never more than there are


def test_grids_scale_neighbour_counts_only():
    kr = scaled_krecip([KReciprocalPoint(160, 80, 0.5), KReciprocalPoint(2, 1, 0.1)], 0.25)
    assert kr == [KReciprocalPoint(40, 20, 0.5), KReciprocalPoint(1, 1, 0.1)]  # at least 1
    sl = scaled_shortlist(
        {
            "GNN": [ShortlistPoint((("k1", 26), ("k2", 7)))],
            "alpha-DBA-QE": [ShortlistPoint((("n_dba", 10), ("n_qe", 3)))],
        },
        0.5,
    )
    assert sl["GNN"][0].kwargs() == {"k1": 13, "k2": 4} and sl["alpha-DBA-QE"][0].kwargs() == {"n_dba": 10, "n_qe": 3}


def test_a_validation_choice_maps_to_the_test_point_at_its_position():
    bl = RetrievalBaselineParams(
        qe_n_grid=[1, 3], krecip_pairs=[(40, 20), (80, 40)], krecip_lambda=[0.3], methods=["AQE", "k-reciprocal"]
    )
    grids = Grids.of(bl, 0.5, qe_scale=1.0)  # QE's n as given (its scaling: the tests below)
    assert grids.val_krecip == (KReciprocalPoint(20, 10, 0.3), KReciprocalPoint(40, 20, 0.3))
    val_choice = BaselineChoice(
        (("AQE", 3),),
        KReciprocalPoint(40, 20, 0.3),  # the second validation point
        (("AQE n=1", 10.0), ("AQE n=3", 12.0), ("k-reciprocal k1=20,k2=10,lambda=0.3", 9.0),
         ("k-reciprocal k1=40,k2=20,lambda=0.3", 11.0)),
        methods=("AQE", "k-reciprocal"),
    )  # fmt: skip
    choice = to_test_grid(val_choice, grids)
    assert choice.krecip == KReciprocalPoint(80, 40, 0.3)
    assert dict(choice.val_map)["k-reciprocal k1=80,k2=40,lambda=0.3"] == 11.0
    val_label = {
        f"k-reciprocal {t.label()}": f"k-reciprocal {v.label()}" for v, t in zip(grids.val_krecip, grids.krecip)
    }
    test_map = [
        ("AQE n=1", 9.0),
        ("AQE n=3", 8.0),
        ("k-reciprocal k1=40,k2=20,lambda=0.3", 7.0),
        ("k-reciprocal k1=80,k2=40,lambda=0.3", 5.0),
    ]
    rows = val_vs_test_rows(choice, val_label, test_map)
    kr = [r for r in rows if r["method"] == "k-reciprocal"]
    assert [r["validation setting"] for r in kr] == ["k1=20,k2=10,lambda=0.3", "k1=40,k2=20,lambda=0.3"]
    assert [(r["chosen on validation"], r["best on test"]) for r in kr] == [("", "yes"), ("yes", "")]
    summary = {s["method"]: s for s in val_vs_test_summary(rows)}
    assert summary["k-reciprocal"]["gap"] == 2.0 and summary["AQE"]["its test mAP"] == 8.0
    assert summary["AQE"]["Spearman val/test"] == -1.0  # validation ranks the two points the other way round


def test_mirrored_validation_pads_the_database_with_training_items(tmp_path):
    rng = np.random.default_rng(0)
    held = np.repeat(np.array(["a", "b", "c"]), 4)  # 3 held-out clusters of 4
    train = np.repeat(np.array([f"t{i}" for i in range(10)]), 5)  # 50 training items
    emb = rng.normal(size=(len(held) + len(train), 8)).astype(np.float32)
    table = tmp_path / "train.parquet"
    write_features(
        table,
        ids=np.arange(len(emb)),
        labels=np.concatenate([held, train]),
        splits=["val"] * len(held) + ["train"] * len(train),
        embeddings=emb,
        metadata={"dataset": "tiny", "backbone": "none", "checkpoint_hash": "-"},
    )
    plain = load_validation(table, 3, seed=1, spread=True)
    assert plain.database.shape == (9, 8) and all(len(g["easy"]) == 3 for g in plain.gnd)
    padded = load_validation(table, 3, seed=1, n_database=30, spread=True)
    assert padded.database.shape == (30, 8) and padded.initial.shape == (3, 30)
    assert np.allclose(padded.database[:9], plain.database)  # held-out items first: the ground truth keeps its indices
    assert [g["easy"].tolist() for g in padded.gnd] == [g["easy"].tolist() for g in plain.gnd]
    unit = emb[len(held) :] / np.linalg.norm(emb[len(held) :], axis=1, keepdims=True)
    assert np.allclose(padded.database[9:], unit[distractor_rows(50, 21, 1)], atol=1e-6)
    assert len(load_validation(table, 3, seed=1, n_database=500).database) == 59  # all there is
    cfg = RetrievalTrainParams(n_val_queries=3, val_database=30, seed=1)
    assert cfg.val_protocol == "mirror-test"
    with pytest.raises(ValueError):
        RetrievalTrainParams(val_protocol="test-set")  # type: ignore[arg-type]
    assert isinstance(padded, ValidationSet)


def test_qe_counts_scale_by_the_positives_ratio_by_hand():
    r = positives_scale(3.2, 18.2)  # glyphs: validation 3.2 positives per query, test 18.2
    assert r == pytest.approx(0.1758, abs=1e-4)
    # 1, 3, 5, 7, 9 x 0.1758 = 0.18, 0.53, 0.88, 1.23, 1.58: rounded, at least 1
    assert [scaled_qe_n(n, r) for n in (1, 3, 5, 7, 9)] == [1, 1, 1, 1, 2]
    assert scaled_qe_n(0, r) == 0  # alpha-DBA-QE's n_dba = 0 (no DBA) stays 0
    assert positives_scale(0.0, 18.2) == 1.0 and positives_scale(3.2, 0.0) == 1.0
    # alpha-DBA-QE: n_dba and n_qe follow qe_scale, GNN's k1/k2 the database scale
    p = scaled_point(ShortlistPoint((("n_dba", 10), ("n_qe", 3))), 0.5, 0.2)
    assert p.kwargs() == {"n_dba": 2, "n_qe": 1}  # 10 x 0.2 = 2, 3 x 0.2 = 0.6 -> 1
    assert scaled_point(ShortlistPoint((("k1", 26), ("k2", 7))), 0.5, 0.2).kwargs() == {"k1": 13, "k2": 4}
    assert scaled_point(ShortlistPoint((("K", 9), ("beta", 0.15))), 0.5, 0.2).kwargs() == {"K": 4, "beta": 0.15}


def test_test_points_sharing_a_validation_point_map_to_the_first_by_hand():
    bl = RetrievalBaselineParams(qe_n_grid=[1, 3, 5, 7, 9], superglobal_k_grid=[3, 6, 9], superglobal_beta_grid=[0.15])
    grids = Grids.of(bl, 887 / 5000, qe_scale=3.2 / 18.2)
    assert grids.val_qe_n == (1, 1, 1, 1, 2) and grids.distinct_val("DQE") == [1, 2]
    # n=1 on validation stands for test n=1 (the first of 1, 3, 5, 7), n=2 for n=9
    assert grids.to_test("AQE", 1) == 1 and grids.to_test("alpha-QE", 2) == 9
    # SuperGlobal K = 3, 6, 9 x 0.1774 = 0.53, 1.06, 1.60 -> 1, 1, 2: K=1 stands for K=3
    sg = grids.distinct_val("SuperGlobal")
    assert [v.kwargs()["K"] for v in sg] == [1, 2]
    assert (
        grids.to_test("SuperGlobal", sg[0]).kwargs()["K"] == 3
        and grids.to_test("SuperGlobal", sg[1]).kwargs()["K"] == 9
    )
    with pytest.raises(ValueError, match="AQE: n=4 is not a point"):
        grids.to_test("AQE", 4)
    # QE's n is scaled only when asked (val_scale_qe) or given; the neighbour counts always
    assert Grids.of(bl, 0.2).val_qe_n == (1, 3, 5, 7, 9)
    assert Grids.of(bl.model_copy(update={"val_scale_qe": True}), 0.2).val_qe_n == (1, 1, 1, 1, 2)
    # held-out (scale 1): every grid as given, each point stands for itself
    same = Grids.of(bl.model_copy(update={"val_scale_qe": True}), 1.0)
    assert same.val_qe_n == same.qe_n and same.val_krecip == same.krecip
    assert all(same.to_test("SuperGlobal", p) == p for p in same.shortlist["SuperGlobal"])


def test_shared_validation_points_give_their_score_to_each_test_point():
    bl = RetrievalBaselineParams(qe_n_grid=[1, 3, 9], methods=["AQE"])
    grids = Grids.of(bl, 1.0, qe_scale=0.2)  # 0.2, 0.6, 1.8 -> 1, 1, 2
    val_choice = BaselineChoice((("AQE", 2),), None, (("AQE n=1", 15.0), ("AQE n=2", 20.0)), methods=("AQE",))
    choice = to_test_grid(val_choice, grids)
    assert choice.qe_n == (("AQE", 9),)
    assert choice.val_map == (("AQE n=1", 15.0), ("AQE n=3", 15.0), ("AQE n=9", 20.0))
    val_label = {"AQE n=1": "AQE n=1", "AQE n=3": "AQE n=1", "AQE n=9": "AQE n=2"}
    rows = val_vs_test_rows(choice, val_label, [("AQE n=1", 30.0), ("AQE n=3", 31.0), ("AQE n=9", 29.0)])
    assert [r["validation setting"] for r in rows] == ["n=1", "n=1", "n=2"]
    assert [r["chosen on validation"] for r in rows] == ["", "", "yes"]
    # average ranks: validation (15, 15, 20) -> 1.5, 1.5, 3; test (30, 31, 29) -> 2, 3, 1:
    # deviations (-0.5, -0.5, 1) and (0, 1, -1): r = -1.5 / sqrt(1.5 * 2) = -0.866
    s = val_vs_test_summary(rows)[0]
    assert s["Spearman val/test"] == -0.87 and s["gap"] == 2.0


def test_choose_on_validation_tries_each_distinct_point_and_answers_on_the_test_grid():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    clusters = np.repeat(np.arange(4), 6)
    emb = centres[clusters] + 0.6 * rng.normal(size=(24, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    val = ValidationSet.from_clusters(emb.astype(np.float32), clusters, 4, seed=0, spread=True)
    bl = RetrievalBaselineParams(qe_n_grid=[1, 3, 5, 7, 9], methods=["AQE", "DQE"])
    choice, val_label = choose_on_validation(val, bl, 1.0, qe_scale=0.2)  # val n: 1, 1, 1, 1, 2
    assert {n for _, n in choice.qe_n} <= {1, 3, 5, 7, 9}
    assert dict(choice.qe_n)["AQE"] in (1, 9)  # n=1 stands for 1 (the first of 1, 3, 5, 7), n=2 for 9
    assert [label for label, _ in choice.val_map if label.startswith("AQE ")] == [f"AQE n={n}" for n in (1, 3, 5, 7, 9)]
    assert val_label["AQE n=7"] == "AQE n=1" and val_label["AQE n=9"] == "AQE n=2"
    same, _ = choose_on_validation(val, bl, 1.0)  # held-out: scale 1, nothing scaled
    assert [label for label, _ in same.val_map if label.startswith("AQE ")] == [f"AQE n={n}" for n in (1, 3, 5, 7, 9)]
