"""The retrieval re-rankers that work on each query's shortlist, by name, with their grids.

Names are the rows of the retrieval table (``RETRIEVAL_METHODS``, the pipeline's
``methods`` parameter). Each entry re-ranks the first ``shortlist`` items (capped at N) of
each query's initial ranking; the rest keep their initial order. ``neighbours(point)`` is the
length of the candidates' neighbour lists a setting needs (0: none, the method works
within the shortlist), served by one :func:`candidate_neighbours` search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from .alpha_dba import alpha_dba_qe
from .diffusion import DIFFUSION_SHORTLIST, diffusion_rerank
from .gnn_rerank import GNN_SHORTLIST, gnn_rerank
from .neighbours import CandidateNeighbours
from .superglobal import SUPERGLOBAL_M, superglobal_rerank

__all__ = [
    "BASELINE_METHODS",
    "RETRIEVAL_METHODS",
    "SHORTLIST_METHODS",
    "ShortlistMethod",
    "ShortlistPoint",
    "shortlist_grids",
    "shortlist_method",
]

BASELINE_METHODS = ("features", "AQE", "AQEwD", "alpha-QE", "DQE", "k-reciprocal")


@dataclass(frozen=True)
class ShortlistPoint:
    """One setting of a shortlist re-ranker: (argument, value) pairs."""

    values: tuple[tuple[str, float], ...]

    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.values)

    def kwargs(self) -> dict:
        return dict(self.values)


# (ids (Q, W), scores (Q, W), expanded query (Q, D) or None): the expanded query is SSR's query node
Result = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class ShortlistMethod:
    """name: the row; shortlist: items re-ranked per query; default: the published setting."""

    name: str
    shortlist: int
    default: ShortlistPoint
    neighbours: Callable[[ShortlistPoint], int]
    run: Callable[[np.ndarray, np.ndarray, np.ndarray, CandidateNeighbours | None, dict], Result]

    def rerank(
        self,
        query_feats: np.ndarray,
        db: np.ndarray,
        topk_ids: np.ndarray,
        neighbours: CandidateNeighbours | None,
        point: ShortlistPoint | None = None,
    ) -> Result:
        """query_feats (Q, D), db (N, D), topk_ids (Q, W) -> (ids, scores, expanded query or None)."""
        return self.run(query_feats, db, topk_ids, neighbours, (point or self.default).kwargs())


def _point(**values: float) -> ShortlistPoint:
    return ShortlistPoint(tuple(values.items()))


def _dba(q, db, top, nbrs, kw) -> Result:
    return alpha_dba_qe(q, db, top, nbrs, n_dba=int(kw["n_dba"]), n_qe=int(kw["n_qe"]))


def _diffusion(q, db, top, nbrs, kw) -> Result:
    ids, f = diffusion_rerank(q, db, top, nbrs, k=int(kw["k"]))
    return ids, f, None


def _gnn(q, db, top, nbrs, kw) -> Result:
    ids, s = gnn_rerank(q, db, top, k1=int(kw["k1"]), k2=int(kw["k2"]))
    return ids, s, None


def _superglobal(q, db, top, nbrs, kw) -> Result:
    return superglobal_rerank(q, db, top, K=int(kw["K"]), beta=float(kw["beta"]))


SHORTLIST_METHODS: dict[str, ShortlistMethod] = {
    m.name: m
    for m in (
        ShortlistMethod(
            "alpha-DBA-QE", DIFFUSION_SHORTLIST, _point(n_dba=10, n_qe=10), lambda p: int(p.kwargs()["n_dba"]), _dba
        ),
        ShortlistMethod("diffusion", DIFFUSION_SHORTLIST, _point(k=50), lambda p: int(p.kwargs()["k"]), _diffusion),
        ShortlistMethod("GNN", GNN_SHORTLIST, _point(k1=26, k2=7), lambda p: 0, _gnn),
        ShortlistMethod("SuperGlobal", SUPERGLOBAL_M, _point(K=9, beta=0.15), lambda p: 0, _superglobal),
    )
}
RETRIEVAL_METHODS = (*BASELINE_METHODS, *SHORTLIST_METHODS)


def shortlist_method(name: str) -> ShortlistMethod:
    """The method called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return SHORTLIST_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown shortlist re-ranker {name!r} (known: {', '.join(SHORTLIST_METHODS)})") from None


def shortlist_grids(
    dba_n: Sequence[int] = (1, 3, 5, 10),
    qe_n: Sequence[int] = (1, 3, 5, 7, 9),
    diffusion_k: Sequence[int] = (10, 20, 50),
    gnn_k: Sequence[Sequence[int]] = ((10, 4), (26, 7), (50, 10)),
    superglobal_k: Sequence[int] = (3, 6, 9),
    superglobal_beta: Sequence[float] = (0.15, 0.3),
) -> dict[str, list[ShortlistPoint]]:
    """The validation grid of every shortlist re-ranker (alpha-QE's n of alpha-DBA-QE is QE's grid)."""
    return {
        "alpha-DBA-QE": [_point(n_dba=int(a), n_qe=int(b)) for a, b in product(dba_n, qe_n)],
        "diffusion": [_point(k=int(k)) for k in diffusion_k],
        "GNN": [_point(k1=int(a), k2=int(b)) for a, b in gnn_k],
        "SuperGlobal": [_point(K=int(k), beta=float(b)) for k, b in product(superglobal_k, superglobal_beta)],
    }
