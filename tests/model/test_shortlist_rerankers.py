"""The retrieval shortlist re-rankers on tiny graphs, against values worked out by hand or by
a straightforward dense numpy computation written here."""

from __future__ import annotations

import numpy as np
import pytest

from ssr_model.baselines import (
    RETRIEVAL_METHODS,
    alpha_dba_qe,
    candidate_neighbours,
    diffusion_rerank,
    gnn_rerank,
    shortlist_grids,
    superglobal_rerank,
    topk_search,
)
from ssr_model.baselines.diffusion import conjugate_gradient


def unit(*rows):
    x = np.asarray(rows, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_topk_search_streams_blocks_and_matches_a_full_sort():
    q, db = random_unit(9, 6, 0), random_unit(53, 6, 1)
    ids, sims = topk_search(q, db, 7, db_block=5, query_block=4)
    full = q @ db.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :7]
    assert ids.shape == (9, 7) and np.array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), rtol=1e-6)


def test_candidate_neighbours_cover_only_the_shortlists_and_drop_the_item_itself():
    db = random_unit(40, 5, 2)
    top = np.array([[3, 7, 1], [7, 20, 3]])
    nb = candidate_neighbours(db, top, k=4, db_block=7)
    assert nb.ids.tolist() == [1, 3, 7, 20] and nb.nbr_ids.shape == (4, 5)
    others, sims = nb.others(np.array([20, 3]), 4)
    for item, row in zip((20, 3), others):
        order = [j for j in np.argsort(-(db @ db[item]), kind="stable") if j != item][:4]
        assert row.tolist() == order
    np.testing.assert_allclose(sims[0], db[others[0]] @ db[20], rtol=1e-5)


def test_alpha_dba_qe_by_hand():
    # database on the unit circle (D = 2); the query along x
    db = unit([1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8])
    q = unit([1, 0])
    top = np.array([[0, 1, 3, 2]])
    nb = candidate_neighbours(db, top, k=1)
    ids, scores, expanded = alpha_dba_qe(q, db, top, nb, n_dba=1, n_qe=1)
    # n_dba = 1: each item plus s^3 times its nearest other item
    d = db.astype(np.float64)
    near = {0: 1, 1: 3, 2: 3, 3: 1}
    aug = np.stack([d[i] + (d[i] @ d[near[i]]) ** 3 * d[near[i]] for i in range(4)])
    aug /= np.linalg.norm(aug, axis=1, keepdims=True)
    first = aug @ q[0]
    best = int(np.argmax(first))
    e = q[0] + first[best] ** 3 * aug[best]
    e /= np.linalg.norm(e)
    final = aug @ e
    assert ids[0].tolist() == np.argsort(-final, kind="stable").tolist()
    np.testing.assert_allclose(scores[0], np.sort(final)[::-1], rtol=1e-5)
    np.testing.assert_allclose(expanded[0], e, rtol=1e-5)
    # n_dba = n_qe = 0 is the plain ranking of the shortlist
    ids0, s0, e0 = alpha_dba_qe(q, db, top, nb, n_dba=0, n_qe=0)
    assert ids0[0].tolist() == [0, 1, 3, 2] and np.allclose(e0, q)


def test_conjugate_gradient_solves_a_small_spd_system():
    A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    b = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(conjugate_gradient(lambda v: A @ v, b, max_iter=10), np.linalg.solve(A, b), rtol=1e-8)


def test_diffusion_on_a_tiny_graph_equals_the_dense_solve():
    # two groups on the circle; the query sees only item 0 (kq = 1) yet diffusion reaches 0's group
    angles = np.deg2rad([10, 20, 30, 100, 110, 120])
    db = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    q = unit([1, 0])
    top = np.array([[0, 1, 2, 3, 4, 5]])
    k, gamma, alpha = 2, 3.0, 0.99
    nb = candidate_neighbours(db, top, k=k)
    ids, f = diffusion_rerank(q, db, top, nb, k=k, kq=1, gamma=gamma, alpha=alpha, max_iter=200, tol=1e-12)
    # independent dense computation: k-NN (others), mutual, s^gamma, symmetric normalisation, solve
    s = db.astype(np.float64) @ db.T.astype(np.float64)
    n = len(db)
    knn = np.zeros((n, n), bool)
    for i in range(n):
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
        knn[i, order] = True
    A = np.where(knn & knn.T, np.maximum(s, 0) ** gamma, 0.0)
    d = A.sum(1)
    Sn = A / np.sqrt(np.outer(d, d))
    y = np.zeros(n)
    y[0] = max(float(q[0] @ db[0]), 0.0) ** gamma
    expected = np.linalg.solve(np.eye(n) - alpha * Sn, y)
    order = np.argsort(-expected, kind="stable")
    assert ids[0].tolist() == order.tolist()
    np.testing.assert_allclose(f[0], expected[order], rtol=1e-5)
    # the second group is not connected to the first: f = 0 there, initial order kept
    assert ids[0, 3:].tolist() == [3, 4, 5] and np.allclose(f[0, 3:], 0)


def test_gnn_rerank_on_a_tiny_graph_equals_a_loop_computation():
    db = random_unit(7, 4, 3)
    q = random_unit(1, 4, 4)
    top = np.argsort(-(q @ db.T), axis=1, kind="stable")
    k1, k2 = 4, 2
    ids, scores = gnn_rerank(q, db, top, k1=k1, k2=k2)
    # loop version of the published steps on nodes [q] + shortlist
    V = np.concatenate([q, db[top[0]]]).astype(np.float64)
    n = len(V)
    S = V @ V.T
    rank = [[i] + [j for j in np.argsort(-S[i], kind="stable") if j != i][: k1 - 1] for i in range(n)]
    A = np.zeros((n, n))
    for i in range(n):
        A[i, rank[i]] = 1
    for _ in range(2):
        A = A + A.T
        B = np.zeros_like(A)
        for i in range(n):
            for m in range(k2):
                B[i] += S[i, rank[i][m]] ** 2 * A[rank[i][m]]
        A = B / np.linalg.norm(B, axis=1, keepdims=True)
    expected = A[1:] @ A[0]
    order = np.argsort(-expected, kind="stable")
    assert ids[0].tolist() == top[0][order].tolist()
    np.testing.assert_allclose(scores[0], expected[order], rtol=1e-5)


def test_gnn_adjacency_by_hand_k1_equals_k2_equals_1():
    # k1 = 1: each node's list is itself, A = I; k2 = 1 skips propagation: every item scores 0 but keeps its order
    db = unit([1, 0], [0, 1])
    ids, scores = gnn_rerank(unit([1, 0.1]), db, np.array([[0, 1]]), k1=1, k2=1)
    assert ids.tolist() == [[0, 1]] and np.allclose(scores, 0)


def test_superglobal_by_hand():
    # M = 3 items, K = 1, beta = 0.5
    db = unit([1, 0], [0.6, 0.8], [0, 1])
    q = unit([0.8, 0.6])
    top = np.array([[0, 1, 2]])
    ids, scores, expanded = superglobal_rerank(q, db, top, K=1, beta=0.5)
    d = db.astype(np.float64)
    # nearest other item: 0 -> 1 (0.6), 1 -> 2 (0.8), 2 -> 1 (0.8)
    ref = np.stack([(d[0] + 0.5 * 0.6 * d[1]) / 1.3, (d[1] + 0.5 * 0.8 * d[2]) / 1.4, (d[2] + 0.5 * 0.8 * d[1]) / 1.4])
    first = ref @ q[0].astype(np.float64)
    best2 = np.argsort(-first)[:2]
    q_max = ref[best2].max(0)
    final = (first + ref @ q_max) / 2
    order = np.argsort(-final, kind="stable")
    assert ids[0].tolist() == order.tolist()
    np.testing.assert_allclose(scores[0], final[order], rtol=1e-6)
    np.testing.assert_allclose(expanded[0], (q[0] + q_max) / np.linalg.norm(q[0] + q_max), rtol=1e-6)


def test_grids_and_names():
    grids = shortlist_grids(qe_n=(1, 3))
    assert len(grids["alpha-DBA-QE"]) == 8 and [p.label() for p in grids["GNN"]] == [
        "k1=10,k2=4",
        "k1=26,k2=7",
        "k1=50,k2=10",
    ]
    assert grids["SuperGlobal"][0].label() == "K=3,beta=0.15"
    assert RETRIEVAL_METHODS[-4:] == ("alpha-DBA-QE", "diffusion", "GNN", "SuperGlobal")


@pytest.mark.parametrize("fn", ["dba", "diffusion", "gnn", "superglobal"])
def test_each_reranker_returns_a_permutation_of_the_shortlist(fn):
    db = random_unit(60, 8, 5)
    q = random_unit(4, 8, 6)
    top = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :20]
    nb = candidate_neighbours(db, top, k=10)
    out = {
        "dba": lambda: alpha_dba_qe(q, db, top, nb, n_dba=3, n_qe=2)[:2],
        "diffusion": lambda: diffusion_rerank(q, db, top, nb, k=5),
        "gnn": lambda: gnn_rerank(q, db, top, k1=6, k2=3),
        "superglobal": lambda: superglobal_rerank(q, db, top, K=3)[:2],
    }[fn]()
    ids, scores = out
    assert ids.shape == top.shape and (np.sort(ids, 1) == np.sort(top, 1)).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
