"""Self-contained models as they are registered in MLflow.

``FewShotClassifier`` bundles the frozen backbone and a trained ``FewShotSSR``: it
classifies a query set given a support set, from features or from images.
``RetrievalReranker`` wraps a ``RetrievalSSR`` and re-orders neighbour lists.
Both keep their methods when pickled by ``mlflow.pytorch.log_model(serialization_format="pickle")``.
"""

from __future__ import annotations

import torch
from torch import nn

from ssr_model.fewshot import FewShotSSR


class FewShotClassifier(nn.Module):
    """Backbone (optional) + FewShotSSR.

    ``forward(support, query)`` takes features: support (n_way, n_shot, D), query (n, D)
    -> scores (n, n_way), for any number of queries n >= 1; batched inputs (E, ...) must
    hold exactly ``self.ssr.n_query`` queries per episode.
    ``classify_images(support_images, query_images)`` takes normalised images:
    support (n_way, n_shot, C, H, W), query (n, C, H, W) -> predicted class (n,).

    SSR refines a fixed-size graph of ``n_query`` queries. When n == n_query the scores
    are exactly SSR's. Otherwise the queries are scored in groups of ``n_query`` (one
    batched call): group g holds queries ``g * n_query ...``, and the last, short group
    is filled with the first queries again, which act as context only (each query's
    score comes from its own group). With n < n_query the queries are repeated to fill
    the single group. The refinement is transductive, so a query's score depends on the
    other queries of its group.
    """

    def __init__(self, ssr: FewShotSSR, backbone: nn.Module | None = None):
        super().__init__()
        self.ssr = ssr
        self.backbone = backbone

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if support.dim() != 3 or query.dim() != 2 or query.shape[0] == self.ssr.n_query:
            return self.ssr(support, query)  # exact SSR; the model checks the shapes
        n, D = query.shape
        if n == 0:
            raise ValueError("FewShotClassifier query: expected at least one query, got shape (0, D)")
        n_query = self.ssr.n_query
        groups = -(-n // n_query)
        index = torch.arange(groups * n_query, device=query.device) % n  # own queries first, then context
        scores = self.ssr(support.expand(groups, *support.shape), query[index].reshape(groups, n_query, D))
        return scores.reshape(groups * n_query, -1)[:n]

    @torch.no_grad()
    def predict(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Predicted class index per query, from features: support (n_way, n_shot, D),
        query (n, D) -> (n,)."""
        return self(support, query).argmax(-1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) images -> (..., D) features."""
        if self.backbone is None:
            raise ValueError("this model has no backbone: pass features to predict() instead of images")
        lead = images.shape[:-3]
        feats = self.backbone(images.reshape(-1, *images.shape[-3:]))
        return feats.reshape(*lead, feats.shape[-1])

    @torch.no_grad()
    def classify_images(self, support_images: torch.Tensor, query_images: torch.Tensor) -> torch.Tensor:
        return self.predict(self.embed(support_images), self.embed(query_images))


class RetrievalReranker(nn.Module):
    """RetrievalSSR with the re-ordering step.

    ``forward(query, neighbours)``: query (B, D), neighbours (B, k, D) -> refined
    similarities (B, k). ``rerank(query, neighbours, neighbour_ids)`` returns the ids
    re-ordered by refined similarity (best first) and the sorted similarities.
    """

    def __init__(self, ssr: nn.Module):
        super().__init__()
        self.ssr = ssr

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return self.ssr(query, neighbours)

    @torch.no_grad()
    def rerank(self, query: torch.Tensor, neighbours: torch.Tensor, neighbour_ids: torch.Tensor):
        sims = self.ssr(query, neighbours)
        order = sims.argsort(dim=-1, descending=True, stable=True)
        return neighbour_ids.gather(-1, order), sims.gather(-1, order)
