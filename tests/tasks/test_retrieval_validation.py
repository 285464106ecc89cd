"""Validation that mirrors the test set (issue 20 item 6): hand-checked on tiny labelled sets."""

from __future__ import annotations

import numpy as np
import pytest

from ssr_model.baselines import KReciprocalPoint, ShortlistPoint
from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams
from ssr_tasks.retrieval.evaluate import BaselineChoice
from ssr_tasks.retrieval.settings import (
    mirrored_database_size,
    protocol_profile,
    scaled_krecip,
    scaled_shortlist,
)
from ssr_tasks.retrieval.train import ValidationSet, distractor_rows, load_validation
from ssr_tasks.retrieval.validation import (
    Grids,
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
    grids = Grids.of(bl, 0.5)
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
