"""storage.topk: the block-wise search on its own (the store built with it: test_simstore.py)."""

import numpy as np
import pytest

from storage.topk import row_blocks, topk_search


def _stable_topk(q, db, k):
    s = q @ db.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("block_rows", [7, 64, 500])
def test_exact_ties_go_to_the_lower_row_whatever_the_blocks(block_rows):
    rng = np.random.default_rng(0)
    base = rng.integers(-2, 3, (30, 8)).astype(np.float32)
    db = base[rng.integers(0, 30, 500)]  # many exact duplicates: tied scores
    q = base[rng.integers(0, 30, 40)]
    ids, scores = topk_search(q, row_blocks(db, block_rows), 25)
    want_ids, want_scores = _stable_topk(q, db, 25)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_ids_and_exclude_self():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    db_ids = np.arange(50) * 10
    ids, _ = topk_search(x[:5], row_blocks(x, 16), 3, database_ids=db_ids, query_ids=db_ids[:5], exclude_self=True)
    rows, _ = _stable_topk(x[:5], x, 4)
    assert not (ids == db_ids[:5, None]).any()
    # a query id not in the database: the (k+1)-th neighbour is dropped instead
    ids, _ = topk_search(x[:5], row_blocks(x, 16), 3, database_ids=db_ids, query_ids=np.full(5, -7), exclude_self=True)
    np.testing.assert_array_equal(ids, db_ids[rows[:, :3]])
    with pytest.raises(ValueError, match="k=60 but the database has 50 rows"):
        topk_search(x[:5], row_blocks(x, 16), 60)
