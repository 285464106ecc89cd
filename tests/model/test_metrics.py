import math

import numpy as np
import pytest

from ssr_model.metrics import accuracy_ci95, compute_ap, revisited_map


def test_accuracy_ci95():
    mean, ci = accuracy_ci95([0.5, 1.0, 0.75, 0.75])
    assert mean == pytest.approx(75.0)
    std = np.sqrt(((np.array([0.5, 1.0, 0.75, 0.75]) - 0.75) ** 2).mean())  # ddof = 0
    assert ci == pytest.approx(100 * 1.96 * std / 2)
    with pytest.raises(ValueError):
        accuracy_ci95([])


def test_compute_ap_hand_checked():
    # positives at cleaned ranks 0 and 2 of 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert compute_ap([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    # a positive never retrieved still counts in n_pos
    assert compute_ap([0], 2) == pytest.approx(0.5)
    assert compute_ap([], 3) == 0.0


def test_revisited_map_protocols_and_junk():
    ranks = np.array([[5, 0, 3, 1, 4, 2]])
    gnd = [{"easy": [0], "hard": [1], "junk": [5]}]
    res = revisited_map(ranks, gnd, kappas=(1, 2))
    # easy: ignore 5 (junk) and 1 (hard) -> cleaned [0, 3, 4, 2]; positive 0 at rank 0 -> AP 1
    assert res["easy"]["map"] == pytest.approx(100.0)
    assert res["easy"]["mp"] == {1: pytest.approx(100.0), 2: pytest.approx(100.0)}  # min(k, last=1) = 1
    # medium: ignore 5 -> cleaned [0, 3, 1, 4, 2]; positives at 0, 2
    assert res["medium"]["map"] == pytest.approx(100 * (0.5 + (0.5 + 2 / 3) / 4))
    assert res["medium"]["mp"][1] == pytest.approx(100.0)
    assert res["medium"]["mp"][2] == pytest.approx(50.0)
    # hard: ignore 5 and 0 -> cleaned [3, 1, 4, 2]; positive 1 at rank 1: (0 + 1/2)/2
    assert res["hard"]["map"] == pytest.approx(25.0)
    assert res["hard"]["mp"][1] == pytest.approx(0.0)
    assert res["hard"]["mp"][2] == pytest.approx(50.0)  # min(2, last=2): 1 of 2


def test_query_without_positives_is_skipped():
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": [1]}]
    res = revisited_map(ranks, gnd, kappas=(1,))
    assert res["easy"]["map"] == pytest.approx(100.0)
    assert res["medium"]["map"] == pytest.approx(100.0)
    assert math.isnan(res["hard"]["map"]) and math.isnan(res["hard"]["mp"][1])


def test_mp_at_k_truncates_at_last_positive():
    ranks = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    gnd = [{"easy": [0, 2], "hard": [], "junk": []}]
    res = revisited_map(ranks, gnd, kappas=(1, 5, 10))
    # positives at 1-based 1 and 3: P@1 = 1, P@min(5, 3) = 2/3, P@min(10, 3) = 2/3
    assert res["easy"]["mp"] == {1: pytest.approx(100.0), 5: pytest.approx(200 / 3), 10: pytest.approx(200 / 3)}


def test_gnd_length_mismatch():
    with pytest.raises(ValueError, match="gnd has 1 entries"):
        revisited_map(np.zeros((2, 3), dtype=int), [{"easy": [0], "hard": [], "junk": []}])
