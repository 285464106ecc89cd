"""SSR for image retrieval re-ranking (SSR_METHOD.md section 4)."""

from __future__ import annotations

import torch
from torch import nn

from ssr_model.dni import DNI
from ssr_model.subgraph import refine, retrieval_pair_positions, retrieval_subgraph_vectors, unit_rows

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

    Gradient behaviour as in :class:`ssr_model.fewshot.FewShotSSR`: total derivatives in
    every update (the database update follows ``B -> q_new -> X`` too); the whole graph
    in train mode with grad enabled; otherwise grad is enabled internally for the
    updates and the output is detached. Same values in every mode.
    """

    pair_rows: torch.Tensor  # buffers (register_buffer in __init__)
    pair_cols: torch.Tensor

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
        q, db = unit_rows(query), unit_rows(database)
        return torch.bmm(db, q.unsqueeze(2)).squeeze(2)

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor, return_all_steps: bool = False) -> torch.Tensor:
        unbatched = query.dim() == 1
        if unbatched:
            query, neighbours = query.unsqueeze(0), neighbours.unsqueeze(0)
        self._check_inputs(query, neighbours)
        keep_graph = self.training and torch.is_grad_enabled()

        rows, cols = self.pair_rows, self.pair_cols
        if rows.device != query.device:
            rows, cols = rows.to(query.device), cols.to(query.device)

        def build_vectors(q: torch.Tensor, database: torch.Tensor, database_gram: torch.Tensor) -> torch.Tensor:
            return retrieval_subgraph_vectors(q, database, rows, cols, database_gram)

        states = refine(
            query, neighbours, build_vectors, self.dni_query, self.dni_database, self.lr_dni, self.steps, keep_graph
        )
        with torch.set_grad_enabled(keep_graph):
            if return_all_steps:
                sims = torch.stack([self.query_similarities(q, db) for q, db in states])
            else:
                sims = self.query_similarities(*states[-1])
        if unbatched:
            sims = sims.squeeze(-2)
        return sims
