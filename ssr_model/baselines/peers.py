"""The few-shot peer methods by name, with what each needs and what it cannot run with.

Names are the ones of the pipeline's ``methods`` parameter and of the metric keys. Each
entry scores a batch of episodes: support (E, n_way, n_shot, D), query (E, n_query, D) ->
(E, n_query, n_way); ``base_mean`` (D,) is the mean training feature, used by the methods
whose paper centres features on the base classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .alpha_tim import alpha_tim
from .bd_cspn import bd_cspn
from .laplacianshot import laplacianshot
from .pt_map import pt_map
from .simpleshot import simpleshot
from .tim import tim_gd


@dataclass(frozen=True)
class PeerMethod:
    """label: the results-table row; transductive: uses the query set; centres_on_base: its
    features are centred on the base-class mean (``score``'s third argument, else unused);
    min_queries: per episode."""

    name: str
    label: str
    transductive: bool
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    centres_on_base: bool = False
    min_queries: int = 1

    def check(self, n_way: int, n_shot: int, n_query: int) -> None:
        """Refuse an episode shape this method cannot run on (n_query: all queries of an episode)."""
        if n_way < 2 or n_shot < 1:
            raise ValueError(f"{self.name}: needs n_way >= 2 and n_shot >= 1, got n_way={n_way}, n_shot={n_shot}")
        if n_query < self.min_queries:
            raise ValueError(f"{self.name}: needs at least {self.min_queries} queries per episode, got {n_query}")


PEER_METHODS: dict[str, PeerMethod] = {
    m.name: m
    for m in (
        PeerMethod(
            "simpleshot",
            "SimpleShot (CL2N, nearest centroid)",
            False,
            lambda s, q, mean: simpleshot(s, q, mean),
            centres_on_base=True,
        ),
        PeerMethod("bd-cspn", "BD-CSPN (rectified prototypes)", True, lambda s, q, mean: bd_cspn(s, q)),
        PeerMethod("tim", "TIM-GD (1,000 Adam steps)", True, lambda s, q, mean: tim_gd(s, q)),
        PeerMethod(
            "alpha-tim",
            "α-TIM (α=2 at 1-shot, 7 at 5-shot; 1,000 Adam steps)",
            True,
            lambda s, q, mean: alpha_tim(s, q),
        ),
        PeerMethod("pt-map", "PT-MAP (power transform + Sinkhorn MAP)", True, lambda s, q, mean: pt_map(s, q)),
        PeerMethod(
            "laplacianshot",
            "LaplacianShot (kNN=3, λ=0.7)",
            True,
            lambda s, q, mean: laplacianshot(s, q, mean),
            centres_on_base=True,
            min_queries=4,
        ),
    )
}


def peer_method(name: str) -> PeerMethod:
    """The method called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return PEER_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown few-shot method {name!r} (peer methods: {', '.join(PEER_METHODS)})") from None
