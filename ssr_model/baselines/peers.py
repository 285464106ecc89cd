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


@dataclass(frozen=True)
class ComposedMethod:
    """A peer method run on SSR's refined features (``ssr+<peer>``): the trained SSR refines the
    episode's support and query features (``FewShotSSR.refine_episode``), then ``peer`` scores
    them as it scores raw features. label: the results-table row."""

    name: str
    label: str
    peer: str

    def check(self, n_way: int, n_shot: int, n_query: int) -> None:
        PEER_METHODS[self.peer].check(n_way, n_shot, n_query)

    def score(
        self,
        refine: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        support: torch.Tensor,
        query: torch.Tensor,
        base_mean: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scores (E, n_query, n_way) of the peer on ``refine(support, query)``."""
        refined_support, refined_query = refine(support, query)
        return PEER_METHODS[self.peer].score(refined_support, refined_query, base_mean)


# Compositions: rows that need a trained SSR (no published system reports them).
COMPOSED_METHODS: dict[str, ComposedMethod] = {
    m.name: m
    for m in (
        ComposedMethod("ssr+tim", "SSR + TIM-GD (TIM on SSR's refined features)", "tim"),
        ComposedMethod("ssr+pt-map", "SSR + PT-MAP (PT-MAP on SSR's refined features)", "pt-map"),
    )
}


def composed_method(name: str) -> ComposedMethod:
    """The composition called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return COMPOSED_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown composed method {name!r} (known: {', '.join(COMPOSED_METHODS)})") from None


def peer_method(name: str) -> PeerMethod:
    """The method called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return PEER_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown few-shot method {name!r} (peer methods: {', '.join(PEER_METHODS)})") from None
