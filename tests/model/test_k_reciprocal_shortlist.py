"""k-reciprocal on the queries' shortlists (bounded memory) against the full-graph one."""

import numpy as np
import pytest

from ssr_model.baselines.k_reciprocal import k_reciprocal, k_reciprocal_shortlist
from ssr_model.baselines.neighbours import LocalSearch


def _graph(Q, N, D, seed):
    x = np.random.default_rng(seed).standard_normal((Q + N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:Q], x[Q:]


def _full(q, db, k1, k2, lam):
    def dist(a, b):
        return np.sqrt(np.maximum(2 - 2 * a @ b.T, 0)).astype(np.float32)

    return k_reciprocal(dist(q, db), dist(q, q), dist(db, db), k1=k1, k2=k2, lambda_value=lam)


class CountingSearch(LocalSearch):
    """Records how many rows each search was asked for."""

    def __init__(self, db, db_block):
        super().__init__(db, db_block)
        self.rows = 0

    def top_with_lowest(self, feats, k):
        self.rows += len(feats)
        return super().top_with_lowest(feats, k)


def _run(q, db, top, k1, k2, lam, db_block=7, levels=1):
    s = CountingSearch(db, db_block)
    ids, dist = k_reciprocal_shortlist(q, db, top, k1, k2, lam, search=s.top_with_lowest, levels=levels)
    return ids, dist, s


@pytest.mark.parametrize(
    "Q, N, D, k1, k2, lam",
    [
        (10, 50, 8, 5, 3, 0.5),
        (30, 120, 16, 20, 6, 0.3),
        (5, 40, 4, 10, 1, 0.2),
        (20, 60, 3, 7, 15, 0.8),
        (3, 4, 2, 20, 6, 0.3),
    ],
)
def test_equals_the_full_graph_when_the_shortlist_covers_the_database(Q, N, D, k1, k2, lam):
    q, db = _graph(Q, N, D, seed=Q + N)
    full = _full(q, db, k1, k2, lam)
    initial = np.argsort(-(q @ db.T), axis=1, kind="stable")
    for levels in (1, 2):
        ids, dist, _ = _run(q, db, initial, k1, k2, lam, levels=levels)
        assert ids.tolist() == np.argsort(full, axis=1, kind="stable").tolist()
        np.testing.assert_allclose(dist, np.take_along_axis(full, ids, axis=1), atol=1e-6, rtol=0)


def test_a_short_list_searches_only_the_shortlists_and_their_lists():
    Q, N, K, k1, k2 = 4, 400, 10, 5, 3
    q, db = _graph(Q, N, 8, seed=1)
    initial = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :K]
    U = len(np.unique(initial))
    for levels in (1, 2):
        ids, dist, s = _run(q, db, initial, k1, k2, 0.3, levels=levels)
        # each row is a permutation of its shortlist, by increasing distance
        assert all(sorted(a) == sorted(b) for a, b in zip(ids.tolist(), initial.tolist()))
        assert (np.diff(dist, axis=1) >= 0).all()
        # searched: the queries and their U <= Q * K items (levels 1), then those lists' new items
        if levels == 1:
            assert s.rows == Q + U
        else:
            assert Q + U < s.rows <= (Q + U) * (k1 + 2) and s.rows < N


def test_a_cache_shared_by_a_grid_gives_the_same_results_with_fewer_searches():
    from ssr_model.baselines.k_reciprocal import NodeListCache

    Q, N, K = 3, 300, 30
    q, db = _graph(Q, N, 8, seed=2)
    initial = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :K]
    grid = [(10, 6, 0.3), (10, 6, 0.5), (4, 3, 0.3), (7, 12, 0.3)]
    cache, cached, fresh_rows = NodeListCache(), CountingSearch(db, 64), 0
    for k1, k2, lam in sorted(grid, key=lambda p: -max(p[0] + 1, p[1])):
        ids, dist, s = _run(q, db, initial, k1, k2, lam)
        fresh_rows += s.rows
        got = k_reciprocal_shortlist(q, db, initial, k1, k2, lam, search=cached.top_with_lowest, cache=cache)
        assert got[0].tolist() == ids.tolist()
        np.testing.assert_allclose(got[1], dist, rtol=1e-6)
    assert 0 < cached.rows < fresh_rows / 2
    # any order is correct (a narrower point first: the wider one replaces its lists)
    cache = NodeListCache()
    for k1, k2, lam in [(4, 3, 0.3), (10, 6, 0.3), (4, 3, 0.5)]:
        want = _run(q, db, initial, k1, k2, lam)[0]
        got = k_reciprocal_shortlist(q, db, initial, k1, k2, lam, search=cached.top_with_lowest, cache=cache)[0]
        assert got.tolist() == want.tolist()
