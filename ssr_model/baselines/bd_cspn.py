"""BD-CSPN (Liu, Song, Qin, ECCV 2020): prototype rectification, then a cosine classifier.

Steps, as in the paper's Section 3 (features L2-normalised first):

1. Cross-class bias: shift every query by xi = mean(support) - mean(query), both means over
   all the episode's samples of that set.
2. Basic prototypes P_n = mean of the support of class n; each shifted query gets the
   pseudo-label argmax_n cos(q, P_n).
3. Intra-class bias: for class n, X_n = its support plus the queries pseudo-labelled n;
   weights w_i = softmax_i(epsilon * cos(x_i, P_n)) over X_n (epsilon = 10, the paper's);
   rectified prototype P'_n = sum_i w_i x_i.
4. Scores: cos(q, P'_n) for the shifted queries.

The paper keeps the top-Z pseudo-labelled queries per class; here every query pseudo-
labelled n is kept (Z = all), so no count has to be chosen per shot setting.
"""

from __future__ import annotations

import torch

from .episode_features import l2n, prototypes, unpack


def bd_cspn_prototypes(
    support: torch.Tensor, query: torch.Tensor, epsilon: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified prototypes (E, n_way, D) and the shifted queries (E, n_query, D).

    support: (E, n_way, n_shot, D); query: (E, n_query, D). Both are L2-normalised first.
    """
    E, W, K, Q, D = unpack(support, query)
    s, q = l2n(support), l2n(query)
    q = q + (s.reshape(E, W * K, D).mean(1) - q.mean(1)).unsqueeze(1)  # cross-class bias
    protos = prototypes(s)  # (E, W, D)
    pseudo = (l2n(q) @ l2n(protos).transpose(1, 2)).argmax(-1)  # (E, Q)
    x = torch.cat([s.reshape(E, W * K, D), q], 1)  # (E, W*K + Q, D)
    labels = torch.cat([torch.arange(W, device=q.device).repeat_interleave(K).expand(E, W * K), pseudo], 1)
    member = labels.unsqueeze(-1) == torch.arange(W, device=q.device)  # (E, W*K + Q, W)
    logits = epsilon * (l2n(x) @ l2n(protos).transpose(1, 2))  # (E, W*K + Q, W)
    weights = torch.softmax(logits.masked_fill(~member, float("-inf")), dim=1)
    return weights.transpose(1, 2) @ x, q


def bd_cspn(support: torch.Tensor, query: torch.Tensor, epsilon: float = 10.0) -> torch.Tensor:
    """Cosine scores (E, n_query, n_way) of the shifted queries to the rectified prototypes.

    support: (E, n_way, n_shot, D); query: (E, n_query, D).
    """
    protos, q = bd_cspn_prototypes(support, query, epsilon)
    return l2n(q) @ l2n(protos).transpose(1, 2)
