import numpy as np
import pytest

from ssr_model.baselines import alpha_qe, aqe, aqe_wd, dqe

# 2-D toy: one query, four database items on the unit circle
Q = np.array([[1.0, 0.0]])
DB = np.array([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.8, -0.6]])
RANKS = np.array([[3, 1, 0, 2]])  # by similarity to the query: 0.8, 0.6, 0.0, -1.0


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_aqe_hand_checked():
    np.testing.assert_allclose(aqe(Q, DB, RANKS, 1)[0], _unit([1.8, -0.6]))
    np.testing.assert_allclose(aqe(Q, DB, RANKS, 2)[0], _unit([2.4, 0.2]))
    np.testing.assert_allclose(aqe(Q, DB, RANKS, 0), Q)


def test_aqe_wd_hand_checked():
    # K = 3: weights 3/3, 2/3, 1/3 for query, top-1, top-2
    want = _unit(np.array([1.0, 0.0]) + 2 / 3 * np.array([0.8, -0.6]) + 1 / 3 * np.array([0.6, 0.8]))
    np.testing.assert_allclose(aqe_wd(Q, DB, RANKS, 2)[0], want)


def test_alpha_qe_hand_checked():
    want = _unit(np.array([1.0, 0.0]) + 0.8**3 * np.array([0.8, -0.6]) + 0.6**3 * np.array([0.6, 0.8]))
    np.testing.assert_allclose(alpha_qe(Q, DB, RANKS, 2, alpha=3)[0], want)
    # alpha = 0 reduces to AQE
    np.testing.assert_allclose(alpha_qe(Q, DB, RANKS, 2, alpha=0), aqe(Q, DB, RANKS, 2))


def test_outputs_are_normalised_batched():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((20, 6))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:3] + 0.1 * rng.standard_normal((3, 6))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranks = np.argsort(-(q @ db.T), axis=1)
    for fn in (aqe, aqe_wd, alpha_qe, dqe):
        out = fn(q, db, ranks, 3)
        assert out.shape == (3, 6)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_dqe_separates_positives_from_negatives():
    # 1 positive + query vs the 2 lowest ranked: the SVM direction points to the positives
    out = dqe(Q, DB, RANKS, 1)
    items = np.array([[1.0, 0.0], [0.8, -0.6], [0.0, 1.0], [-1.0, 0.0]])
    scores = items @ out[0]
    assert scores[:2].min() > scores[2:].max()
    # hand check: SVM with positives (1, 0), (0.8, -0.6), negatives (0, 1), (-1, 0) has a
    # weight vector parallel to that of sklearn's coef_
    from sklearn.svm import SVC

    svm = SVC(kernel="linear").fit(items, [1, 1, -1, -1])
    np.testing.assert_allclose(out[0], _unit(svm.coef_[0]), atol=1e-8)


def test_dqe_needs_disjoint_negatives():
    with pytest.raises(ValueError, match="negatives"):
        dqe(Q, DB, RANKS, 2)


def test_n_out_of_range():
    with pytest.raises(ValueError, match="n = 5"):
        aqe(Q, DB, RANKS, 5)


def test_dqe_negatives_from_a_lowest_search_equal_the_full_ranking():
    from ssr_model.baselines.neighbours import LocalSearch

    rng = np.random.default_rng(5)
    db = _unit(rng.standard_normal((60, 6)))
    q = _unit(rng.standard_normal((4, 6)))
    ranks = np.argsort(-(q @ db.T), axis=1, kind="stable")
    lowest, _ = LocalSearch(db, db_block=7).lowest(q, 4)
    assert lowest.tolist() == ranks[:, ::-1][:, :4].tolist()  # lowest first
    np.testing.assert_allclose(dqe(q, db, ranks[:, :3], 3, negatives=lowest), dqe(q, db, ranks, 3), atol=1e-10)
    with pytest.raises(ValueError, match=r"negatives \(4, 2\), expected \(4, >= 4\)"):
        dqe(q, db, ranks[:, :3], 3, negatives=lowest[:, :2])
