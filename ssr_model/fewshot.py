"""SSR for transductive few-shot classification (SSR_METHOD.md section 3)."""

from __future__ import annotations

import torch
from torch import nn

from ssr_model.dni import DNI
from ssr_model.subgraph import fewshot_pair_positions, fewshot_subgraph_vectors, refine, unit_rows

__all__ = ["FewShotSSR", "fewshot_dni_input_dim"]


def fewshot_dni_input_dim(n_way: int, n_query: int) -> int:
    """``d_in = (M + 1) M / 2 - n_query (n_query - 1) / 2`` with M = n_way + n_query."""
    M = n_way + n_query
    return (M + 1) * M // 2 - n_query * (n_query - 1) // 2


class FewShotSSR(nn.Module):
    """Refines prototypes and queries of few-shot episodes with two DNIs, then scores.

    Args:
        feat_dim: feature dimension D.
        n_way: classes per episode.
        n_query: queries per episode, all classes together (e.g. 5 x 15 = 75).
        steps: refinement steps; a plain mutable attribute (the curriculum changes it).
        lr_dni: step size of the synthetic-gradient updates.
        hidden: DNI hidden width.
        device, dtype: forwarded to the parameters.

    State dict (strict-compatible with the authors' released ``SSR`` entries):
    ``scale_cls`` of shape (1,) (initialised at 10; the released checkpoints store it
    with shape (1,), so it is a one-element tensor rather than a 0-d scalar),
    ``dni_support.*`` and ``dni_query.*`` (see :class:`ssr_model.dni.DNI`).

    Forward:
        support: (n_way, n_shot, D) or batched (E, n_way, n_shot, D).
        query: (n_query, D) or batched (E, n_query, D).
        return_all_steps: if True, also return the scores before refinement and after
            every step.
        returns: scores ``scale_cls * cos(Q, P)`` of shape (n_query, n_way), batched
            (E, n_query, n_way); with ``return_all_steps`` a tensor of shape
            (steps + 1, [E,] n_query, n_way) whose entry t is the score after t steps.

    Every update uses the total derivative of SSR_METHOD.md section 3.4 (autograd along
    all paths of the refinement graph), so the scores equal the authors' code.
    Training (module in train mode with grad enabled) keeps the whole graph: the scores
    are differentiable w.r.t. the inputs and every parameter. Otherwise (eval mode, or
    under ``torch.no_grad()``) the refinement enables grad internally, because each
    update is itself a gradient, and the returned scores are detached; the values are
    the same in every mode.
    """

    pair_rows: torch.Tensor  # buffers (register_buffer in __init__)
    pair_cols: torch.Tensor

    def __init__(
        self,
        feat_dim: int,
        n_way: int,
        n_query: int,
        steps: int,
        lr_dni: float = 1e-3,
        hidden: int = 4096,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.n_way = n_way
        self.n_query = n_query
        self.steps = steps
        self.lr_dni = lr_dni
        self.d_in = fewshot_dni_input_dim(n_way, n_query)
        self.scale_cls = nn.Parameter(torch.full((1,), 10.0, device=device, dtype=dtype))
        self.dni_support = DNI(self.d_in, hidden, device=device, dtype=dtype)
        self.dni_query = DNI(self.d_in, hidden, device=device, dtype=dtype)
        pair_rows, pair_cols = fewshot_pair_positions(n_way, n_query, device=device)
        # Index buffers follow .to(device) but stay out of the state dict.
        self.register_buffer("pair_rows", pair_rows, persistent=False)
        self.register_buffer("pair_cols", pair_cols, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, n_way={self.n_way}, n_query={self.n_query}, "
            f"steps={self.steps}, lr_dni={self.lr_dni}, d_in={self.d_in}"
        )

    def _check_inputs(self, support: torch.Tensor, query: torch.Tensor) -> None:
        if support.dim() != 4 or query.dim() != 3:
            raise ValueError(
                "FewShotSSR: expected support (n_way, n_shot, D) and query (n_query, D), or batched "
                f"(E, n_way, n_shot, D) and (E, n_query, D); got support {tuple(support.shape)}, "
                f"query {tuple(query.shape)}"
            )
        E, n_way, n_shot, D = support.shape
        if n_way != self.n_way or D != self.feat_dim:
            raise ValueError(
                f"FewShotSSR support: expected n_way={self.n_way} and D={self.feat_dim}, "
                f"got shape {tuple(support.shape)}"
            )
        if query.shape != (E, self.n_query, self.feat_dim):
            raise ValueError(
                f"FewShotSSR query: expected shape {(E, self.n_query, self.feat_dim)} "
                f"(n_query={self.n_query}), got {tuple(query.shape)}"
            )

    def class_scores(self, prototypes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``scale_cls * cos(queries, prototypes)``.

        Args:
            prototypes: shape (E, n_way, D).
            queries: shape (E, n_query, D).

        Returns:
            scores of shape (E, n_query, n_way).
        """
        p, q = unit_rows(prototypes), unit_rows(queries)
        return self.scale_cls * torch.bmm(q, p.transpose(1, 2))

    def _refine(
        self, support: torch.Tensor, query: torch.Tensor, keep_graph: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prototypes and queries after 0..steps refinements; support (E, n_way, n_shot, D), query (E, n_query, D)."""
        rows, cols = self.pair_rows, self.pair_cols
        if rows.device != support.device:
            rows, cols = rows.to(support.device), cols.to(support.device)

        def build_vectors(prototypes: torch.Tensor, queries: torch.Tensor, query_gram: torch.Tensor) -> torch.Tensor:
            return fewshot_subgraph_vectors(prototypes, queries, rows, cols, query_gram)

        return refine(
            support.mean(2),  # prototypes (E, n_way, D)
            query,  # (E, n_query, D)
            build_vectors, self.dni_support, self.dni_query, self.lr_dni, self.steps, keep_graph,
        )  # fmt: skip

    def refine_episode(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SSR's output features of a batch of episodes, for another classifier to read (``ssr+tim``, ``ssr+pt-map``).

        SSR refines the class prototypes and the queries (``steps`` steps). Each support
        feature moves by the refinement of its class prototype, so the refined support's
        class means are the refined prototypes and a 1-shot support is the refined prototype
        itself. support (E, n_way, n_shot, D), query (E, n_query, D) -> the same shapes,
        detached (inference values, whatever the mode).
        """
        self._check_inputs(support, query)
        prototypes, queries = self._refine(support, query, keep_graph=False)[-1]
        refined_support = support.detach() + (prototypes - support.detach().mean(2)).unsqueeze(2)
        return refined_support, queries

    def forward(self, support: torch.Tensor, query: torch.Tensor, return_all_steps: bool = False) -> torch.Tensor:
        unbatched = support.dim() == 3
        if unbatched:
            support, query = support.unsqueeze(0), query.unsqueeze(0)
        self._check_inputs(support, query)
        keep_graph = self.training and torch.is_grad_enabled()
        states = self._refine(support, query, keep_graph)
        with torch.set_grad_enabled(keep_graph):
            if return_all_steps:
                scores = torch.stack([self.class_scores(p, q) for p, q in states])
            else:
                scores = self.class_scores(*states[-1])
        if unbatched:
            scores = scores.squeeze(-3)
        return scores
