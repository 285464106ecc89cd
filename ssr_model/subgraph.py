"""Pure functions for SSR subgraphs and the synthetic-gradient refinement
(SSR_METHOD.md sections 3-4).

Every function works on a batch of E independent graphs (episodes or queries) at once;
no Python loop runs over nodes or graphs. A subgraph is described by

* ``order``: for every reference node r, the node indices of its subgraph list,
  shape (E, M, L), computed from detached similarities (sorting carries no gradient);
* ``pair_rows``, ``pair_cols``: the (row, col) positions, inside an L x L subgraph, of
  the kept strictly-upper-triangular entries in row-major order, shape (d_in,).

The vector of reference r is ``A[order[r, pair_rows], order[r, pair_cols]]``, gathered
from the flattened similarity matrix ``A`` so that the gathered values carry gradient.

:func:`refine` runs the alternating DNI updates. Each update is
``x <- x - lr_dni * d<X, DNI(X)>/dx`` taken with ``torch.autograd.grad(X, x,
grad_outputs=DNI(X), create_graph=True)`` on the whole batch, exactly as the authors do:
the derivative is *total*. The other node set was computed from ``x`` by the previous
update, so the gradient also follows ``x -> other set -> X`` (through the similarities
and through the previous DNI's output), and so on back to the inputs. This path cannot
be written as a function of the current features alone: half-step i needs i - 1 extra
passes through earlier DNIs (a 3-step few-shot episode: 6 DNI forwards and 15 DNI
vector-Jacobian or Jacobian-vector passes), and autograd schedules exactly those.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "unit_rows",
    "cosine_from_gram",
    "gram_matrix",
    "two_set_cosine",
    "kept_pair_positions",
    "fewshot_pair_positions",
    "retrieval_pair_positions",
    "fewshot_subgraph_order",
    "retrieval_subgraph_order",
    "subgraph_flat_index",
    "gather_subgraph_vectors",
    "dni_update",
    "refine",
    "fewshot_subgraph_vectors",
    "retrieval_subgraph_vectors",
]

NORMALIZE_EPS = 1e-12


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / max(|x|, 1e-12)`` over the last axis, written as ``x * rsqrt(max(|x|^2, 1e-24))``.

    Same values as ``F.normalize(x, dim=-1, eps=1e-12)`` (the authors' call), but every
    derivative order stays finite at a zero row (``F.normalize``'s second derivative is
    0/0 there), which the nested refinement gradients need.

    Args:
        x: shape (..., D).

    Returns:
        shape (..., D).
    """
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS * NORMALIZE_EPS))


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix: ``G_ij / (n_i n_j)``, ``n = max(sqrt(diag G), 1e-12)``.

    The same values as normalising the features first (eps 1e-12, as the authors), and
    every derivative order stays finite at a zero row (the clamp sits on the squared
    norm, where ``F.normalize``'s second derivative is 0/0).

    Args:
        gram: ``nodes nodes^T`` of shape (E, M, M).

    Returns:
        A of shape (E, M, M).
    """
    inv_norm = torch.rsqrt(torch.diagonal(gram, dim1=1, dim2=2).clamp_min(NORMALIZE_EPS * NORMALIZE_EPS))  # (E, M)
    return gram * inv_norm.unsqueeze(2) * inv_norm.unsqueeze(1)


def gram_matrix(nodes: torch.Tensor) -> torch.Tensor:
    """``nodes nodes^T``: (E, M, D) -> (E, M, M)."""
    return torch.bmm(nodes, nodes.transpose(1, 2))


def two_set_cosine(first: torch.Tensor, second: torch.Tensor, second_gram: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities of the nodes ``[first, second]``, assembled from Gram blocks.

    The (E, S, S) block of the larger set can be passed in: the refinement computes it
    once per step and reuses it in both half-steps (``second`` only changes in the second
    one). Only that block's matmul reads all of the large set's features; the gradient
    w.r.t. ``first`` never touches it.

    Args:
        first: shape (E, R, D).
        second: shape (E, S, D).
        second_gram: ``second second^T`` of shape (E, S, S), or None to compute it.

    Returns:
        A of shape (E, R + S, R + S), nodes ordered ``first`` then ``second``.
    """
    if second_gram is None:
        second_gram = gram_matrix(second)
    cross = torch.bmm(first, second.transpose(1, 2))  # (E, R, S)
    top = torch.cat((gram_matrix(first), cross), dim=2)
    bottom = torch.cat((cross.transpose(1, 2), second_gram), dim=2)
    return cosine_from_gram(torch.cat((top, bottom), dim=1))


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


def fewshot_subgraph_vectors(
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    pair_rows: torch.Tensor,
    pair_cols: torch.Tensor,
    query_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """DNI inputs of a batch of few-shot episodes.

    Args:
        prototypes: shape (E, n_way, D).
        queries: shape (E, n_query, D).
        pair_rows, pair_cols: from :func:`fewshot_pair_positions`, shape (d_in,).
        query_gram: ``queries queries^T`` of shape (E, n_query, n_query), if already known.

    Returns:
        X of shape (E, M, d_in), M = n_way + n_query; row r is the vector of reference r
        (prototypes first, then queries).
    """
    E, n_way, D = prototypes.shape
    sim = two_set_cosine(prototypes, queries, query_gram)
    order = fewshot_subgraph_order(sim.detach(), n_way)
    return gather_subgraph_vectors(sim, subgraph_flat_index(order, pair_rows, pair_cols))


def retrieval_subgraph_vectors(
    query: torch.Tensor,
    database: torch.Tensor,
    pair_rows: torch.Tensor,
    pair_cols: torch.Tensor,
    database_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """DNI inputs of a batch of retrieval graphs.

    Args:
        query: shape (E, D).
        database: the top-k neighbours of each query, shape (E, k, D).
        pair_rows, pair_cols: from :func:`retrieval_pair_positions`, shape (2k + 1,).
        database_gram: ``database database^T`` of shape (E, k, k), if already known.

    Returns:
        X of shape (E, 1 + k, 2k + 1); row 0 is the query's vector, row 1 + i the vector
        of neighbour i.
    """
    sim = two_set_cosine(query.unsqueeze(1), database, database_gram)
    order = retrieval_subgraph_order(sim.detach())
    return gather_subgraph_vectors(sim, subgraph_flat_index(order, pair_rows, pair_cols))


def dni_update(
    vectors: torch.Tensor,
    target: torch.Tensor,
    dni: Callable[[torch.Tensor], torch.Tensor],
    lr_dni: float,
    create_graph: bool,
) -> torch.Tensor:
    """One synthetic-gradient update ``target - lr_dni * d<X, DNI(X)>/d target``.

    The derivative is autograd's, along every path of the current graph from ``target``
    to ``X`` (the total derivative of SSR_METHOD.md section 3.4).

    Args:
        vectors: X, the subgraph vectors built from ``target`` (and the other node set),
            shape (E, M, d_in).
        target: the node features being updated, shape (E, R, D) (or (E, D)); must be part
            of the graph of ``vectors``.
        dni: maps (E, M, d_in) to (E, M, d_in); its output is the upstream gradient of X.
        lr_dni: step size.
        create_graph: keep the graph of the update (training, and every inference update
            that a later update differentiates through). Without it the DNI runs without
            autograd and the update is a plain value.

    Returns:
        the updated features, same shape as ``target``.
    """
    if create_graph:
        upstream = dni(vectors)
    else:
        with torch.no_grad():
            upstream = dni(vectors.detach())
    (grad,) = torch.autograd.grad(vectors, target, grad_outputs=upstream, create_graph=create_graph)
    return target - lr_dni * grad


def refine(
    first: torch.Tensor,
    second: torch.Tensor,
    build_vectors: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    first_dni: Callable[[torch.Tensor], torch.Tensor],
    second_dni: Callable[[torch.Tensor], torch.Tensor],
    lr_dni: float,
    steps: int,
    keep_graph: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Alternating SSR refinement: per step, update ``first`` with ``first_dni``, rebuild
    the subgraphs, then update ``second`` with ``second_dni``.

    Args:
        first: the set updated first (few-shot prototypes (E, n_way, D); retrieval query
            (E, D)).
        second: the set updated second (few-shot queries (E, n_query, D); retrieval
            neighbours (E, k, D)).
        build_vectors: ``(first, second, second_gram) -> X`` of shape (E, M, d_in), where
            ``second_gram`` is ``second second^T`` (E, S, S), computed once per step.
        first_dni, second_dni: the two DNIs.
        lr_dni: step size.
        steps: number of refinement steps.
        keep_graph: True in training: every update keeps its graph, so the returned
            features are differentiable w.r.t. the inputs and the DNI parameters.
            False at inference: the refinement runs under ``torch.enable_grad()`` (and
            outside ``torch.inference_mode``) on detached copies of the inputs, because
            the updates need autograd whatever the ambient mode; the last update builds
            no graph, and every returned tensor is detached. The values are the same
            either way.

    Returns:
        ``[(first, second)]`` after 0, 1, ..., ``steps`` steps.
    """
    if not keep_graph:
        first, second = first.detach(), second.detach()
    states = [(first, second)]
    n_updates = 2 * steps
    # Under torch.inference_mode() autograd is off for good: leave it for the refinement
    # (inference tensors must be copied into ordinary ones to enter a graph).
    with torch.inference_mode(False), torch.enable_grad():
        first = first.clone() if first.is_inference() else first
        second = second.clone() if second.is_inference() else second
        # autograd.grad needs both sets in the graph; a tensor that does not require grad
        # (features from a frozen backbone) enters as a leaf that does.
        if not first.requires_grad:
            first = first.detach().requires_grad_(True)
        if not second.requires_grad:
            second = second.detach().requires_grad_(True)
        for step in range(steps):
            second_gram = gram_matrix(second)  # unchanged by the first half-step: reused
            first = dni_update(
                build_vectors(first, second, second_gram),
                first,
                first_dni,
                lr_dni,
                keep_graph or 2 * step + 1 < n_updates,
            )
            second = dni_update(
                build_vectors(first, second, second_gram),
                second,
                second_dni,
                lr_dni,
                keep_graph or 2 * step + 2 < n_updates,
            )
            states.append((first, second))
    if not keep_graph:
        states = [(a.detach(), b.detach()) for a, b in states]
    return states
