"""SimpleShot (Wang et al., 2019): nearest class mean after centring and L2 normalisation (inductive).

CL2N: features minus the mean feature of the base (training) classes, then L2-normalised;
the class centroid is the mean of the transformed support features and a query goes to the
nearest centroid in Euclidean distance. Without ``base_mean`` it is the paper's L2N variant.
"""

from __future__ import annotations

import torch

from .episode_features import cl2n, prototypes, sq_dist, unpack


def simpleshot(support: torch.Tensor, query: torch.Tensor, base_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Negative squared distances to the CL2N centroids.

    support: (E, n_way, n_shot, D); query: (E, n_query, D); base_mean: (D,) or None.
    Returns scores (E, n_query, n_way), argmax = nearest centroid.
    """
    unpack(support, query)
    return -sq_dist(cl2n(query, base_mean), prototypes(cl2n(support, base_mean)))
