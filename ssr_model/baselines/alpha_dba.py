"""alpha-DBA + alpha-QE (Radenovic et al., TPAMI 2018; DBA from Gordo et al., IJCV 2017), on a shortlist.

Database-side augmentation: each database vector d is replaced by

    d' = normalise(d + sum_{j=1..n_dba} (d . d_j)^alpha d_j)

over its n_dba nearest other database items d_j (weight of d itself: 1 = (d . d)^alpha).
Then alpha query expansion on the augmented database:

    q' = normalise(q + sum_{i=1..n_qe} (q . d'_(i))^alpha d'_(i))

where d'_(i) is the i-th item of the ranking by q . d'. The result ranks by q' . d'.
alpha = 3 (published). Powers are of the signed similarity, as in :func:`alpha_qe`.

Truncation: augmenting all N items needs the neighbour lists of all N. Here only the
items of each query's shortlist (its initial top-W) are augmented and re-ranked, from the
neighbour lists of those candidates (:func:`candidate_neighbours`); items beyond the
shortlist keep their initial order (the caller appends them).

Memory: the lists (U, L) of the U <= Q * W distinct candidates, one query's augmented
shortlist (W, D) at a time, and (Q, W) results; nothing of size N x N or Q x N.
"""

from __future__ import annotations

import numpy as np

from .neighbours import CandidateNeighbours

__all__ = ["alpha_dba_qe", "DBA_ALPHA"]

DBA_ALPHA = 3.0


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def augment(
    db: np.ndarray, ids: np.ndarray, neighbours: CandidateNeighbours, n_dba: int, alpha: float = DBA_ALPHA
) -> np.ndarray:
    """alpha-DBA vectors (W, D) float32 of the database items ``ids`` (W,), all candidates of ``neighbours``."""
    out = np.asarray(db[ids], dtype=np.float32).copy()
    if n_dba > 0:
        nbr, sims = neighbours.others(ids, n_dba)  # (W, n_dba)
        weights = np.power(sims, np.float32(alpha))
        for j in range(n_dba):  # one (W, D) gather at a time
            out += weights[:, j : j + 1] * np.asarray(db[nbr[:, j]], dtype=np.float32)
    return _normalise(out)


def alpha_dba_qe(
    query_feats: np.ndarray,
    db: np.ndarray,
    topk_ids: np.ndarray,
    neighbours: CandidateNeighbours,
    n_dba: int = 10,
    n_qe: int = 10,
    alpha: float = DBA_ALPHA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each shortlist by alpha-DBA + alpha-QE, one query at a time.

    Args:
        query_feats: (Q, D) L2-normalised queries.
        db: (N, D) L2-normalised database (rows read by id only).
        topk_ids: (Q, W) each query's initial shortlist, best first.
        neighbours: lists of the shortlists' candidates, at least n_dba others each.
        n_dba, n_qe: neighbours of the augmentation and of the expansion (n_qe <= W);
            10 and 10 are our defaults, the papers tune them per dataset.

    Returns:
        ids (Q, W) the shortlist re-ordered best first, scores (Q, W) float32 (q' . d'),
        and the expanded queries q' (Q, D) float32.

    Memory per query: the (W, D) augmented shortlist; overall the candidates' lists and (Q, W).
    """
    Q, W = topk_ids.shape
    if not 0 <= n_qe <= W:
        raise ValueError(f"alpha_dba_qe: n_qe = {n_qe}, expected 0 <= n_qe <= {W} (shortlist length)")
    ids_out = np.empty_like(topk_ids)
    scores_out = np.empty((Q, W), dtype=np.float32)
    expanded = np.empty(query_feats.shape, dtype=np.float32)
    for i in range(Q):
        aug = augment(db, topk_ids[i], neighbours, n_dba, alpha)  # (W, D)
        q = np.asarray(query_feats[i], dtype=np.float32)
        first = aug @ q
        top = np.argsort(-first, kind="stable")[:n_qe]
        expanded[i] = _normalise(q + np.power(first[top], np.float32(alpha)) @ aug[top])
        scores = aug @ expanded[i]
        order = np.argsort(-scores, kind="stable")
        ids_out[i], scores_out[i] = topk_ids[i][order], scores[order]
    return ids_out, scores_out, expanded
