"""Shared pieces of the transductive few-shot peers (pure torch): shapes, prototypes, normalisations.

Every peer method takes one batch of episodes in the layout of ``ssr_model.FewShotSSR``:
support (E, n_way, n_shot, D), class-major, and query (E, n_query, D) where n_query counts
all queries of an episode (in any order, any class counts). It returns scores
(E, n_query, n_way) whose argmax is the prediction. The device and dtype follow the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpack(support: torch.Tensor, query: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(E, n_way, n_shot, n_query, D) of a batch, checked. support (E, n_way, n_shot, D), query (E, n_query, D)."""
    if support.dim() != 4 or query.dim() != 3:
        raise ValueError(
            f"expected support (E, n_way, n_shot, D) and query (E, n_query, D), got {tuple(support.shape)} "
            f"and {tuple(query.shape)}"
        )
    E, W, K, D = support.shape
    if query.shape[0] != E or query.shape[2] != D:
        raise ValueError(
            f"query {tuple(query.shape)} does not match support {tuple(support.shape)} (E and D must agree)"
        )
    return E, W, K, query.shape[1], D


def l2n(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation of the last axis (eps 1e-12, as the rest of the project)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def cl2n(x: torch.Tensor, base_mean: torch.Tensor | None) -> torch.Tensor:
    """SimpleShot's CL2N: subtract the base-class mean feature (D,), then L2-normalise; L2N without a mean."""
    return l2n(x - base_mean.to(x) if base_mean is not None else x)


def prototypes(support: torch.Tensor) -> torch.Tensor:
    """Class means: support (E, n_way, n_shot, D) -> (E, n_way, D)."""
    return support.mean(2)


def support_one_hot(support: torch.Tensor) -> torch.Tensor:
    """One-hot labels of the flattened support: (E, n_way * n_shot, n_way), class-major like ``support``."""
    E, W, K, _ = support.shape
    eye = torch.eye(W, device=support.device, dtype=support.dtype)
    return eye.repeat_interleave(K, dim=0).expand(E, W * K, W)


def sq_dist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, x (E, N, D) and centres (E, W, D) -> (E, N, W), clamped at 0."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ centres.transpose(1, 2) + (centres * centres).sum(-1).unsqueeze(1)
    return d.clamp_min(0)
