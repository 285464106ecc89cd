"""LaplacianShot (Ziko, Dolz, Granger, Ben Ayed, ICML 2020): Laplacian-regularised nearest prototype.

Features are CL2N (SimpleShot's: minus the base-class mean, L2-normalised); prototypes m_c
are the support means. Unary a_qc = ||x_q - m_c||^2. The affinity w_qp is 1 when p is one of
the ``knn`` = 3 nearest other queries of q (not symmetrised, as the authors' graph). The
energy over soft assignments y_q on the simplex

    E(Y) = sum_q y_q . a_q  -  lam * sum_{q,p} w_qp y_q . y_p  +  sum_q y_q . log y_q

is decreased by the paper's bound updates, all queries in parallel:

    y_q <- softmax(-a_q + lam * sum_p w_qp y_p),   starting from y_q = softmax(-a_q),

until the energy changes by at most 1e-6 of its value, or 20 iterations. ``lam`` is the one
hyper-parameter the paper tunes on validation episodes per data set.
"""

from __future__ import annotations

import torch

from .episode_features import cl2n, prototypes, sq_dist, unpack


def knn_affinity(x: torch.Tensor, knn: int) -> torch.Tensor:
    """Binary kNN graph W (E, N, N): W[e, q, p] = 1 if p is among the knn nearest of q (p != q). x (E, N, D)."""
    E, N, _ = x.shape
    d = sq_dist(x, x)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    idx = d.topk(knn, dim=-1, largest=False).indices  # (E, N, knn)
    return torch.zeros(E, N, N, dtype=x.dtype, device=x.device).scatter_(-1, idx, 1.0)


def laplacian_energy(y: torch.Tensor, unary: torch.Tensor, affinity: torch.Tensor, lam: float) -> torch.Tensor:
    """E(Y) per episode (E,): y and unary (E, n_query, n_way), affinity (E, n_query, n_query)."""
    pair = (y * (affinity @ y)).sum((1, 2))
    return (y * unary).sum((1, 2)) - lam * pair + (y * torch.log(y.clamp_min(1e-20))).sum((1, 2))


def bound_updates(
    unary: torch.Tensor,
    affinity: torch.Tensor,
    lam: float,
    max_iters: int = 20,
    rel_tol: float = 1e-6,
    energies: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Assignments (E, n_query, n_way) from the bound iterations (all episodes until each has converged).

    unary: (E, n_query, n_way); affinity: (E, n_query, n_query). ``energies`` receives E(Y) (E,) after each update.
    """
    y = torch.softmax(-unary, -1)
    old = laplacian_energy(y, unary, affinity, lam)
    done = torch.zeros_like(old, dtype=torch.bool)
    for _ in range(max_iters):
        new_y = torch.softmax(-unary + lam * (affinity @ y), -1)
        y = torch.where(done[:, None, None], y, new_y)
        energy = laplacian_energy(y, unary, affinity, lam)
        if energies is not None:
            energies.append(energy)
        done = done | ((energy - old).abs() <= rel_tol * old.abs())
        old = energy
        if bool(done.all()):
            break
    return y


def laplacianshot(
    support: torch.Tensor,
    query: torch.Tensor,
    base_mean: torch.Tensor | None = None,
    lam: float = 0.7,
    knn: int = 3,
    max_iters: int = 20,
) -> torch.Tensor:
    """Soft assignments (E, n_query, n_way).

    support: (E, n_way, n_shot, D); query: (E, n_query, D); base_mean: (D,) or None (then L2N only).
    """
    E, W, K, Q, D = unpack(support, query)
    if Q <= knn:
        raise ValueError(f"laplacianshot: needs more than knn={knn} queries per episode, got {Q}")
    q = cl2n(query, base_mean)
    unary = sq_dist(q, prototypes(cl2n(support, base_mean)))
    return bound_updates(unary, knn_affinity(q, knn), lam, max_iters)
