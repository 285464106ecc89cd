"""The baselines' parameter grids of the paper (SSR_METHOD section 6) and the choice of a point.

The grids are the published ones; which point is used is decided by the caller on
validation scores (never on the test queries), with :func:`best_point`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import TypeVar

__all__ = ["KReciprocalPoint", "RETRIEVAL_KRECIP_K", "RETRIEVAL_KRECIP_LAMBDA", "QE_N", "best_point", "krecip_grid"]

RETRIEVAL_KRECIP_K: tuple[tuple[int, int], ...] = ((40, 20), (80, 40), (160, 80))  # (k1, k2) pairs
RETRIEVAL_KRECIP_LAMBDA: tuple[float, ...] = (0.1, 0.3, 0.5)
QE_N: tuple[int, ...] = (1, 3, 5, 7, 9)  # top-n items of query expansion

T = TypeVar("T")


@dataclass(frozen=True)
class KReciprocalPoint:
    """One k-reciprocal setting: reciprocal set size k1, query-expansion size k2, weight lambda."""

    k1: int
    k2: int
    lambda_value: float

    def label(self) -> str:
        return f"k1={self.k1},k2={self.k2},lambda={self.lambda_value:g}"


def krecip_grid(
    pairs: Sequence[Sequence[int]] = RETRIEVAL_KRECIP_K, lambdas: Sequence[float] = RETRIEVAL_KRECIP_LAMBDA
) -> list[KReciprocalPoint]:
    """Every (k1, k2) pair with every lambda, pairs outermost (the authors' loop order)."""
    return [KReciprocalPoint(int(k1), int(k2), float(lam)) for (k1, k2), lam in product(pairs, lambdas)]


def best_point(points: Sequence[T], scores: Sequence[float]) -> tuple[T, float]:
    """The point with the highest score (the first one on ties) and its score."""
    if len(points) != len(scores) or not points:
        raise ValueError(
            f"best_point: {len(points)} points and {len(scores)} scores, expected the same non-zero number"
        )
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    return points[best], float(scores[best])
