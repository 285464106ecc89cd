"""Pure functions for SSR subgraphs (SSR_METHOD.md sections 3-4).

Every function works on a batch of E independent graphs (episodes or queries) at once;
no Python loop runs over nodes or graphs. A subgraph is described by

* ``order``: for every reference node r, the node indices of its subgraph list,
  shape (E, M, L), computed from detached similarities (sorting carries no gradient);
* ``pair_rows``, ``pair_cols``: the (row, col) positions, inside an L x L subgraph, of
  the kept strictly-upper-triangular entries in row-major order, shape (d_in,).

The vector of reference r is ``A[order[r, pair_rows], order[r, pair_cols]]``, gathered
from the flattened similarity matrix ``A`` so that the gathered values carry gradient.

:func:`synthetic_gradient_step` performs one DNI update. Instead of calling
``torch.autograd.grad(X, features, grad_outputs=DNI(X))`` it applies the chain rule in
closed form (scatter the DNI output onto A, ``(G + G^T) U`` for the unit features U,
then the normalisation Jacobian), restricted to the rows being updated and folded into
one (R, M) mixing matrix, so the features are touched by one Gram matmul and one mixing
matmul per update. The formula is
made of ordinary differentiable torch ops, so during training autograd differentiates
through it (the second-order terms of the paper), and at inference it runs under
``torch.no_grad()`` with no graph at all. tests/model/oracle.py checks it against
autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_similarity_matrix",
    "kept_pair_positions",
    "fewshot_pair_positions",
    "retrieval_pair_positions",
    "fewshot_subgraph_order",
    "retrieval_subgraph_order",
    "subgraph_flat_index",
    "gather_subgraph_vectors",
    "scatter_subgraph_gradient",
    "synthetic_gradient_step",
    "fewshot_subgraph_vectors",
    "retrieval_subgraph_vectors",
]

NORMALIZE_EPS = 1e-12


def cosine_similarity_matrix(nodes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of nodes.

    Args:
        nodes: features of shape (E, M, D).

    Returns:
        A of shape (E, M, M), ``A[e, i, j] = cos(nodes[e, i], nodes[e, j])`` with the
        features L2-normalised with eps 1e-12.
    """
    unit = F.normalize(nodes, dim=-1, eps=NORMALIZE_EPS)
    return torch.bmm(unit, unit.transpose(1, 2))


def kept_pair_positions(
    length: int, first_free: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the kept entries of an L x L subgraph, row-major.

    Keeps (i, j) with i < j, except pairs where both i and j are >= ``first_free`` (the
    trailing group whose mutual similarities are dropped).

    Args:
        length: subgraph size L.
        first_free: start of the trailing group.
        device: device of the returned index tensors.

    Returns:
        ``(pair_rows, pair_cols)``, two long tensors of shape (d_in,).
    """
    rows, cols = torch.triu_indices(length, length, offset=1, device=device)
    keep = rows < first_free  # i < j, so "both in the trailing group" is "i >= first_free"
    return rows[keep], cols[keep]


def fewshot_pair_positions(
    n_way: int, n_query: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions of the few-shot subgraph ``[r] + prototypes + queries``.

    Returns:
        ``(pair_rows, pair_cols)`` of shape (d_in,), with
        ``d_in = (M + 1) M / 2 - n_query (n_query - 1) / 2`` and M = n_way + n_query.
    """
    return kept_pair_positions(1 + n_way + n_query, 1 + n_way, device)


def retrieval_pair_positions(k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions of the retrieval subgraph ``[r] + [q] + database``.

    Returns:
        ``(pair_rows, pair_cols)`` of shape (2k + 1,).
    """
    return kept_pair_positions(k + 2, 2, device)


@torch.no_grad()
def fewshot_subgraph_order(sim: torch.Tensor, n_way: int) -> torch.Tensor:
    """Subgraph node lists of every reference in every episode (no gradient).

    Args:
        sim: similarities of shape (E, M, M); nodes 0..n_way-1 are prototypes, the rest
            queries.
        n_way: number of prototypes.

    Returns:
        order of shape (E, M, 1 + M): ``[r] + prototypes sorted by decreasing similarity
        to r + queries sorted by decreasing similarity to r``.
    """
    E, M, _ = sim.shape
    proto_order = torch.argsort(sim[:, :, :n_way], dim=-1, descending=True)
    query_order = torch.argsort(sim[:, :, n_way:], dim=-1, descending=True) + n_way
    ref = torch.arange(M, device=sim.device).view(1, M, 1).expand(E, M, 1)
    return torch.cat((ref, proto_order, query_order), dim=-1)


@torch.no_grad()
def retrieval_subgraph_order(sim: torch.Tensor) -> torch.Tensor:
    """Subgraph node lists for retrieval graphs ``[q] + database`` (no gradient).

    Args:
        sim: similarities of shape (E, M, M), M = 1 + k, node 0 is the query.

    Returns:
        order of shape (E, M, k + 2): ``[r] + [q] + database items sorted by decreasing
        similarity to r``.
    """
    E, M, _ = sim.shape
    db_order = torch.argsort(sim[:, :, 1:], dim=-1, descending=True) + 1
    ref = torch.arange(M, device=sim.device).view(1, M, 1).expand(E, M, 1)
    query = torch.zeros_like(ref)
    return torch.cat((ref, query, db_order), dim=-1)


def subgraph_flat_index(order: torch.Tensor, pair_rows: torch.Tensor, pair_cols: torch.Tensor) -> torch.Tensor:
    """Positions in the flattened (M * M) similarity matrix of every subgraph entry.

    Args:
        order: subgraph node lists of shape (E, M, L).
        pair_rows, pair_cols: kept positions of shape (d_in,), values in [0, L).

    Returns:
        long tensor of shape (E, M * d_in); entry (e, r * d_in + p) is
        ``order[e, r, pair_rows[p]] * M + order[e, r, pair_cols[p]]``.
    """
    E, M, _ = order.shape
    flat = order[:, :, pair_rows] * M + order[:, :, pair_cols]  # (E, M, d_in)
    return flat.reshape(E, -1)


def gather_subgraph_vectors(sim: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Gather the subgraph vectors of every reference.

    Args:
        sim: similarities of shape (E, M, M) (may carry gradient).
        flat_index: from :func:`subgraph_flat_index`, shape (E, M * d_in).

    Returns:
        X of shape (E, M, d_in).
    """
    E, M, _ = sim.shape
    return sim.reshape(E, M * M).gather(1, flat_index).reshape(E, M, -1)


def scatter_subgraph_gradient(upstream: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Gradient of ``<X, upstream>`` w.r.t. the similarity matrix (X gathered with flat_index).

    Args:
        upstream: gradient w.r.t. X, shape (E, M, d_in).
        flat_index: from :func:`subgraph_flat_index`, shape (E, M * d_in).

    Returns:
        G of shape (E, M, M): each entry sums the upstream values gathered from it.
    """
    E, M, _ = upstream.shape
    flat = upstream.new_zeros(E, M * M).scatter_add(1, flat_index, upstream.reshape(E, -1))
    return flat.reshape(E, M, M)


def synthetic_gradient_step(
    nodes: torch.Tensor,
    rows: slice,
    order_fn: Callable[[torch.Tensor], torch.Tensor],
    pair_rows: torch.Tensor,
    pair_cols: torch.Tensor,
    dni: Callable[[torch.Tensor], torch.Tensor],
    lr_dni: float,
) -> torch.Tensor:
    """One DNI update of the nodes ``rows``: ``x - lr_dni * d<X, DNI(X)>/dx``.

    X are the subgraph vectors of all M references built from ``nodes``; the DNI output
    is the upstream gradient of X (not differentiated as a function of x in the inner
    gradient); the derivative is the partial one w.r.t. ``nodes[:, rows]``, all other
    nodes held fixed.

    Args:
        nodes: all node features of shape (E, M, D).
        rows: the nodes to update, e.g. ``slice(0, n_way)``; R of them.
        order_fn: detached similarities (E, M, M) -> subgraph node lists (E, M, L).
        pair_rows, pair_cols: kept positions, shape (d_in,).
        dni: maps (E, M, d_in) to (E, M, d_in).
        lr_dni: step size.

    Returns:
        the updated features of the selected nodes, shape (E, R, D).
    """
    E, M, D = nodes.shape
    norm = torch.linalg.vector_norm(nodes, dim=-1)  # (E, M)
    inv_norm = 1.0 / norm.clamp_min(NORMALIZE_EPS)  # (E, M)
    gram = torch.bmm(nodes, nodes.transpose(1, 2))  # (E, M, M)
    sim = gram * inv_norm.unsqueeze(2) * inv_norm.unsqueeze(1)  # cosine, = U U^T
    flat_index = subgraph_flat_index(order_fn(sim.detach()), pair_rows, pair_cols)
    vectors = gather_subgraph_vectors(sim, flat_index)  # (E, M, d_in)
    grad_sim = scatter_subgraph_gradient(dni(vectors), flat_index)  # (E, M, M)

    # Chain rule, written so that the (E, M, D) features are only read by the norm and
    # two matmuls (U is never materialised). With n = max(|x|, eps) and U = x / n:
    # sim = U U^T gives d<sim, G>/dU_r = (S U)_r with S = (G + G^T) restricted to rows r;
    # the normalisation gives grad_x_r = ((S U)_r - radial_r U_r) / n_r with
    # radial_r = <(S U)_r, U_r> = sum_j S_rj sim_rj (zero where |x_r| <= eps). Hence
    # x_r - lr grad_x_r = (1 + lr radial_r / n_r^2) x_r - (lr / n_r) sum_j (S_rj / n_j) x_j.
    start, stop, _ = rows.indices(M)
    inv_rows = inv_norm[:, start:stop]  # (E, R)
    grad_sim_rows = grad_sim[:, start:stop, :] + grad_sim[:, :, start:stop].transpose(1, 2)  # (E, R, M)
    radial = (grad_sim_rows * sim[:, start:stop, :]).sum(-1)  # (E, R)
    radial = torch.where(norm[:, start:stop] > NORMALIZE_EPS, radial, torch.zeros_like(radial))
    mix = grad_sim_rows * (-lr_dni * inv_rows).unsqueeze(2) * inv_norm.unsqueeze(1)  # (E, R, M)
    keep = torch.diag_embed(1.0 + lr_dni * radial * inv_rows * inv_rows)  # (E, R, R)
    mix = mix + F.pad(keep, (start, M - stop))  # identity part placed on the updated columns
    return torch.bmm(mix, nodes)  # (E, R, D)


def fewshot_subgraph_vectors(
    prototypes: torch.Tensor, queries: torch.Tensor, pair_rows: torch.Tensor, pair_cols: torch.Tensor
) -> torch.Tensor:
    """DNI inputs of a batch of few-shot episodes.

    Args:
        prototypes: shape (E, n_way, D).
        queries: shape (E, n_query, D).
        pair_rows, pair_cols: from :func:`fewshot_pair_positions`, shape (d_in,).

    Returns:
        X of shape (E, M, d_in), M = n_way + n_query; row r is the vector of reference r
        (prototypes first, then queries).
    """
    E, n_way, D = prototypes.shape
    sim = cosine_similarity_matrix(torch.cat((prototypes, queries), dim=1))
    order = fewshot_subgraph_order(sim.detach(), n_way)
    return gather_subgraph_vectors(sim, subgraph_flat_index(order, pair_rows, pair_cols))


def retrieval_subgraph_vectors(
    query: torch.Tensor, database: torch.Tensor, pair_rows: torch.Tensor, pair_cols: torch.Tensor
) -> torch.Tensor:
    """DNI inputs of a batch of retrieval graphs.

    Args:
        query: shape (E, D).
        database: the top-k neighbours of each query, shape (E, k, D).
        pair_rows, pair_cols: from :func:`retrieval_pair_positions`, shape (2k + 1,).

    Returns:
        X of shape (E, 1 + k, 2k + 1); row 0 is the query's vector, row 1 + i the vector
        of neighbour i.
    """
    sim = cosine_similarity_matrix(torch.cat((query.unsqueeze(1), database), dim=1))
    order = retrieval_subgraph_order(sim.detach())
    return gather_subgraph_vectors(sim, subgraph_flat_index(order, pair_rows, pair_cols))
