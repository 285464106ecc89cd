"""Evaluation metrics: few-shot accuracy with 95% interval, revisited Oxford/Paris mAP and mP@k.

Pure numpy; results are in percent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["accuracy_ci95", "compute_ap", "revisited_map"]

_PROTOCOLS = ("easy", "medium", "hard")


def accuracy_ci95(per_episode_accuracies: Iterable[float]) -> tuple[float, float]:
    """Mean accuracy and 95% confidence half-width, both in percent.

    Args:
        per_episode_accuracies: accuracies as fractions in [0, 1], one per episode.

    Returns:
        (100 * mean, 100 * 1.96 * std / sqrt(n)) with the population std (numpy ``ddof=0``),
        as in the SIB / SSR evaluation code.
    """
    acc = np.asarray(list(per_episode_accuracies), dtype=np.float64)
    if acc.size == 0:
        raise ValueError("accuracy_ci95: no episode accuracies, expected at least one")
    return float(100.0 * acc.mean()), float(100.0 * 1.96 * acc.std() / np.sqrt(acc.size))


def compute_ap(ranks: Sequence[int] | np.ndarray, n_pos: int) -> float:
    """Average precision with trapezoidal integration of the precision-recall curve.

    Args:
        ranks: 0-based positions of the positives in the cleaned ranking (ignored items
            removed), ascending, shape (n_found,).
        n_pos: number of positives of the query (recall denominator).

    For the j-th found positive (0-based) at rank r it adds
    ``((j / r if r > 0 else 1) + (j + 1) / (r + 1)) / 2 / n_pos``. Returns a fraction in [0, 1].
    """
    r = np.asarray(ranks, dtype=np.float64)
    if n_pos <= 0:
        raise ValueError(f"compute_ap: n_pos = {n_pos}, expected > 0")
    j = np.arange(r.size, dtype=np.float64)
    prec_before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    prec_after = (j + 1) / (r + 1)
    return float(((prec_before + prec_after) / 2.0).sum() / n_pos)


def _clean_positions(ranked: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based positions of ``positives`` in ``ranked`` after removing ``ignored`` items."""
    keep = ~np.isin(ranked, ignored)
    cleaned = ranked[keep]
    return np.flatnonzero(np.isin(cleaned, positives))


def revisited_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict]:
    """mAP and mP@k under the revisited Oxford / Paris Easy, Medium and Hard protocols.

    Args:
        ranks: (n_query, n_db) database indices, best first, per query.
        gnd: per query a mapping with index lists ``easy``, ``hard``, ``junk``.
        kappas: cut-offs k of mP@k.

    Protocols: easy = positives easy, ignore junk + hard; medium = positives easy + hard,
    ignore junk; hard = positives hard, ignore junk + easy. Ignored items are removed from
    the ranking first. Queries without positives are left out of both means. mP@k follows
    revisitop: with the 1-based cleaned positions of the positives and ``last`` the largest,
    precision at min(k, last) i.e. the number of positives in the first min(k, last) cleaned
    ranks divided by min(k, last).

    Returns:
        ``{"easy" | "medium" | "hard": {"map": float, "mp": {k: float}}}`` in percent
        (NaN where no query of the protocol has positives).
    """
    ranks = np.asarray(ranks)
    n_query = ranks.shape[0]
    if len(gnd) != n_query:
        raise ValueError(f"revisited_map: gnd has {len(gnd)} entries, expected one per ranks row ({n_query})")
    out: dict[str, dict] = {}
    for protocol in _PROTOCOLS:
        aps, precisions = [], []
        for q in range(n_query):
            easy = np.asarray(gnd[q].get("easy", []), dtype=np.int64)
            hard = np.asarray(gnd[q].get("hard", []), dtype=np.int64)
            junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
            if protocol == "easy":
                positives, ignored = easy, np.concatenate([junk, hard])
            elif protocol == "medium":
                positives, ignored = np.concatenate([easy, hard]), junk
            else:
                positives, ignored = hard, np.concatenate([junk, easy])
            if positives.size == 0:
                continue
            pos = _clean_positions(ranks[q], positives, ignored)
            aps.append(compute_ap(pos, positives.size))
            one_based = pos + 1
            last = one_based.max() if one_based.size else 0
            row = {}
            for k in kappas:
                cut = min(last, k)
                row[k] = float((one_based <= cut).sum() / cut) if cut > 0 else 0.0
            precisions.append(row)
        n_valid = len(aps)
        out[protocol] = {
            "map": float(100.0 * np.mean(aps)) if n_valid else float("nan"),
            "mp": {
                k: (float(100.0 * np.mean([p[k] for p in precisions])) if n_valid else float("nan")) for k in kappas
            },
        }
    return out
