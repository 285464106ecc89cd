"""SSR for image retrieval re-ranking (SSR_METHOD.md section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssr_model.dni import DNI
from ssr_model.subgraph import (
    NORMALIZE_EPS,
    retrieval_pair_positions,
    retrieval_subgraph_order,
    synthetic_gradient_step,
)

__all__ = ["RetrievalSSR", "retrieval_dni_input_dim"]


def retrieval_dni_input_dim(k: int) -> int:
    """``d_in = (k + 2)(k + 1) / 2 - k (k - 1) / 2 = 2k + 1``."""
    return 2 * k + 1


class RetrievalSSR(nn.Module):
    """Refines a query and its top-k neighbours with two DNIs; returns refined cosines.

    Args:
        feat_dim: feature dimension D.
        k: number of neighbours per query.
        steps: refinement steps (mutable attribute).
        lr_dni: step size of the synthetic-gradient updates.
        hidden: DNI hidden width.
        device, dtype: forwarded to the parameters.

    State dict (strict-compatible with the authors' released checkpoints):
    ``scale_cls`` of shape (1,) (initialised at 10; used only by the InfoBCE loss),
    ``dni_query.*``, ``dni_database.*``.

    Forward:
        query: (D,) or batched (B, D).
        neighbours: the top-k database features of each query, ranked by the initial
            score, (k, D) or batched (B, k, D).
        return_all_steps: if True, return the similarities after 0..steps steps stacked.
        returns: refined cosine similarities between the query and its neighbours, (k,)
            or (B, k); with ``return_all_steps`` shape (steps + 1, [B,] k). The caller
            re-orders the neighbours by it (items beyond the top-k keep their order).

    Gradient behaviour as in :class:`ssr_model.fewshot.FewShotSSR`: second-order graph in
    train mode with grad enabled, no graph otherwise, same values.
    """

    def __init__(
        self,
        feat_dim: int,
        k: int,
        steps: int,
        lr_dni: float = 1e-4,
        hidden: int = 1024,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.k = k
        self.steps = steps
        self.lr_dni = lr_dni
        self.d_in = retrieval_dni_input_dim(k)
        self.scale_cls = nn.Parameter(torch.full((1,), 10.0, device=device, dtype=dtype))
        self.dni_query = DNI(self.d_in, hidden, device=device, dtype=dtype)
        self.dni_database = DNI(self.d_in, hidden, device=device, dtype=dtype)
        pair_rows, pair_cols = retrieval_pair_positions(k, device=device)
        self.register_buffer("pair_rows", pair_rows, persistent=False)
        self.register_buffer("pair_cols", pair_cols, persistent=False)

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, k={self.k}, steps={self.steps}, lr_dni={self.lr_dni}, d_in={self.d_in}"

    def _check_inputs(self, query: torch.Tensor, neighbours: torch.Tensor) -> None:
        if query.dim() != 2 or neighbours.dim() != 3:
            raise ValueError(
                "RetrievalSSR: expected query (D,) and neighbours (k, D), or batched (B, D) and "
                f"(B, k, D); got query {tuple(query.shape)}, neighbours {tuple(neighbours.shape)}"
            )
        B, D = query.shape
        if D != self.feat_dim:
            raise ValueError(f"RetrievalSSR query: expected D={self.feat_dim}, got shape {tuple(query.shape)}")
        if neighbours.shape != (B, self.k, self.feat_dim):
            raise ValueError(
                f"RetrievalSSR neighbours: expected shape {(B, self.k, self.feat_dim)} (k={self.k}), "
                f"got {tuple(neighbours.shape)}"
            )

    @staticmethod
    def query_similarities(query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each query with its neighbours.

        Args:
            query: shape (B, D).
            database: shape (B, k, D).

        Returns:
            shape (B, k).
        """
        q = F.normalize(query, dim=-1, eps=NORMALIZE_EPS)
        db = F.normalize(database, dim=-1, eps=NORMALIZE_EPS)
        return torch.bmm(db, q.unsqueeze(2)).squeeze(2)

    def forward(
        self, query: torch.Tensor, neighbours: torch.Tensor, return_all_steps: bool = False
    ) -> torch.Tensor:
        unbatched = query.dim() == 1
        if unbatched:
            query, neighbours = query.unsqueeze(0), neighbours.unsqueeze(0)
        self._check_inputs(query, neighbours)
        keep_graph = self.training and torch.is_grad_enabled()

        rows, cols = self.pair_rows, self.pair_cols
        if rows.device != query.device:
            rows, cols = rows.to(query.device), cols.to(query.device)

        nodes = torch.cat((query.unsqueeze(1), neighbours), dim=1)  # (B, 1 + k, D)
        states = [nodes]  # refined nodes after 0, 1, ... steps
        with torch.set_grad_enabled(keep_graph):  # inference: no autograd in the refinement
            for _ in range(self.steps):
                q = synthetic_gradient_step(
                    nodes, slice(0, 1), retrieval_subgraph_order, rows, cols, self.dni_query, self.lr_dni
                )
                nodes = torch.cat((q, nodes[:, 1:]), dim=1)
                database = synthetic_gradient_step(
                    nodes, slice(1, None), retrieval_subgraph_order, rows, cols, self.dni_database, self.lr_dni
                )
                nodes = torch.cat((q, database), dim=1)
                states.append(nodes)

        if return_all_steps:
            sims = torch.stack([self.query_similarities(n[:, 0], n[:, 1:]) for n in states])
        else:
            sims = self.query_similarities(nodes[:, 0], nodes[:, 1:])
        if unbatched:
            sims = sims.squeeze(-2)
        return sims
