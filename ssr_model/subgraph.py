"""Pure functions that turn node features into SSR subgraph vectors (SSR_METHOD.md 3-4).

Every function works on a batch of E independent graphs (episodes or queries) at once;
no Python loop runs over nodes or graphs. A subgraph is described by

* ``order``: for every reference node r, the node indices of its subgraph list,
  shape (E, M, L), computed from detached similarities (sorting carries no gradient);
* ``pair_rows``, ``pair_cols``: the (row, col) positions, inside an L x L subgraph, of
  the kept strictly-upper-triangular entries in row-major order, shape (d_in,).

The vector of reference r is ``A[order[r, pair_rows], order[r, pair_cols]]``, gathered
from the flattened similarity matrix ``A`` so that the gathered values carry gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_similarity_matrix",
    "kept_pair_positions",
    "fewshot_pair_positions",
    "retrieval_pair_positions",
    "fewshot_subgraph_order",
    "retrieval_subgraph_order",
    "gather_subgraph_vectors",
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


def gather_subgraph_vectors(
    sim: torch.Tensor, order: torch.Tensor, pair_rows: torch.Tensor, pair_cols: torch.Tensor
) -> torch.Tensor:
    """Gather the flattened subgraph vectors of every reference.

    Args:
        sim: similarities of shape (E, M, M) (may carry gradient).
        order: subgraph node lists of shape (E, M, L).
        pair_rows, pair_cols: kept positions of shape (d_in,), values in [0, L).

    Returns:
        X of shape (E, M, d_in), ``X[e, r, p] = sim[e, order[e, r, pair_rows[p]],
        order[e, r, pair_cols[p]]]``.
    """
    E, M, _ = sim.shape
    d_in = pair_rows.shape[0]
    flat_index = order[:, :, pair_rows] * M + order[:, :, pair_cols]  # (E, M, d_in)
    return sim.reshape(E, M * M).gather(1, flat_index.reshape(E, M * d_in)).reshape(E, M, d_in)


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
    return gather_subgraph_vectors(sim, order, pair_rows, pair_cols)


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
    return gather_subgraph_vectors(sim, order, pair_rows, pair_cols)
