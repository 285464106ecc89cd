"""SSR for transductive few-shot classification (SSR_METHOD.md section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssr_model.dni import DNI
from ssr_model.subgraph import (
    NORMALIZE_EPS,
    fewshot_pair_positions,
    fewshot_subgraph_order,
    synthetic_gradient_step,
)

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

    Training (module in train mode with grad enabled) keeps the second-order graph of
    the updates. Otherwise (eval mode, or under ``torch.no_grad()``) the refinement runs
    on detached tensors and keeps no graph; the values are the same. In eval mode with
    grad enabled the only differentiable path left is through ``scale_cls``.
    """

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
        p = F.normalize(prototypes, dim=-1, eps=NORMALIZE_EPS)
        q = F.normalize(queries, dim=-1, eps=NORMALIZE_EPS)
        return self.scale_cls * torch.bmm(q, p.transpose(1, 2))

    def forward(
        self, support: torch.Tensor, query: torch.Tensor, return_all_steps: bool = False
    ) -> torch.Tensor:
        unbatched = support.dim() == 3
        if unbatched:
            support, query = support.unsqueeze(0), query.unsqueeze(0)
        self._check_inputs(support, query)
        keep_graph = self.training and torch.is_grad_enabled()

        prototypes = support.mean(2)  # (E, n_way, D)
        queries = query  # (E, n_query, D)
        rows, cols = self.pair_rows, self.pair_cols
        if rows.device != support.device:
            rows, cols = rows.to(support.device), cols.to(support.device)
        n_way = self.n_way

        def order_fn(sim: torch.Tensor) -> torch.Tensor:
            return fewshot_subgraph_order(sim, n_way)

        states = [(prototypes, queries)]  # refined features after 0, 1, ... steps
        # Inference: the refinement itself runs without autograd; scoring below follows the
        # ambient mode (so in eval mode with grad enabled, scale_cls stays differentiable).
        with torch.set_grad_enabled(keep_graph):
            for _ in range(self.steps):
                nodes = torch.cat((prototypes, queries), dim=1)  # (E, M, D)
                prototypes = synthetic_gradient_step(
                    nodes, slice(0, n_way), order_fn, rows, cols, self.dni_support, self.lr_dni
                )
                nodes = torch.cat((prototypes, queries), dim=1)
                queries = synthetic_gradient_step(
                    nodes, slice(n_way, None), order_fn, rows, cols, self.dni_query, self.lr_dni
                )
                states.append((prototypes, queries))

        if return_all_steps:
            scores = torch.stack([self.class_scores(p, q) for p, q in states])
        else:
            scores = self.class_scores(prototypes, queries)
        if unbatched:
            scores = scores.squeeze(-3)
        return scores
