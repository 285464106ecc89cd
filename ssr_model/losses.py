"""Training losses of SSR (SSR_METHOD.md sections 4 and 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fewshot_cross_entropy", "info_bce"]


def fewshot_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of few-shot scores, averaged over all queries of all episodes.

    Args:
        scores: logits of shape (n_query, n_way) or (E, n_query, n_way).
        labels: class indices in [0, n_way), shape (n_query,) or (E, n_query).

    Returns:
        scalar loss.
    """
    n_way = scores.shape[-1]
    if labels.shape != scores.shape[:-1]:
        raise ValueError(
            f"fewshot_cross_entropy labels: expected shape {tuple(scores.shape[:-1])} to match "
            f"scores {tuple(scores.shape)}, got {tuple(labels.shape)}"
        )
    return F.cross_entropy(scores.reshape(-1, n_way), labels.reshape(-1).long())


def info_bce(refined_sims: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """InfoBCE loss of refined neighbour similarities (InfoNCE with one positive at a time).

    For one query with scaled similarities ``z = scale * x`` the loss is the mean over its
    positives p of ``-log(exp(z_p) / (exp(z_p) + sum_negatives exp(z_n)))``, computed as
    ``logaddexp(z_p, logsumexp(z_negatives)) - z_p``. A query without negatives has loss 0
    for each positive.

    Batch reduction: each query's loss is the mean over its own positives; the batch loss
    is the mean over the queries that have at least one positive (queries without
    positives contribute nothing). For B = 1 this is exactly the paper's loss. If no query
    of the batch has a positive, the result is a zero that is still connected to the graph
    (``backward`` works and gives zero gradients).

    Args:
        refined_sims: refined similarities x of shape (B, k) or (k,).
        positives: bool mask of shape (B, k) or (k,), True where the neighbour has the
            query's label.
        scale: ``scale_cls``, a float or a tensor broadcastable to (B, k) (e.g. shape (1,)).

    Returns:
        scalar loss.
    """
    if refined_sims.dim() == 1:
        refined_sims, positives = refined_sims.unsqueeze(0), positives.unsqueeze(0)
    if positives.shape != refined_sims.shape:
        raise ValueError(
            f"info_bce positives: expected shape {tuple(refined_sims.shape)} to match refined_sims, "
            f"got {tuple(positives.shape)}"
        )
    B, k = refined_sims.shape
    positives = positives.bool()
    negatives = ~positives
    z = scale * refined_sims  # (B, k)

    has_negative = negatives.any(dim=1, keepdim=True)  # (B, 1)
    # Rows without negatives get a finite dummy before logsumexp, then -inf by torch.where,
    # so no NaN appears in the backward pass.
    masked = z.masked_fill(positives, float("-inf")).masked_fill(~has_negative, 0.0)
    negative_lse = torch.where(
        has_negative, torch.logsumexp(masked, dim=1, keepdim=True), torch.full_like(z[:, :1], float("-inf"))
    )  # (B, 1)
    per_pair = torch.logaddexp(z, negative_lse) - z  # (B, k), meaningful at positives

    n_pos = positives.sum(dim=1)  # (B,)
    has_positive = n_pos > 0
    if not bool(has_positive.any()):
        return z.sum() * 0.0
    per_query = (per_pair * positives).sum(dim=1)[has_positive] / n_pos[has_positive]
    return per_query.mean()
