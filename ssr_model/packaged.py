"""Self-contained models as they are registered in MLflow.

``FewShotClassifier`` bundles the frozen backbone and a trained ``FewShotSSR``: it
classifies a query set given a support set, from features or from images.
``RetrievalReranker`` wraps a ``RetrievalSSR`` and re-orders neighbour lists.
Both keep their methods when pickled by ``mlflow.pytorch.log_model(serialization_format="pickle")``.
"""
from __future__ import annotations

import torch
from torch import nn


class FewShotClassifier(nn.Module):
    """Backbone (optional) + FewShotSSR.

    ``forward(support, query)`` takes features: support (n_way, n_shot, D), query
    (n_query, D) -> scores (n_query, n_way); batched (E, ...) inputs work too.
    ``classify_images(support_images, query_images)`` takes normalised images:
    support (n_way, n_shot, C, H, W), query (n_query, C, H, W) -> predicted class (n_query,).
    ``n_query`` must equal the number the model was trained for (``self.ssr.n_query``).
    """

    def __init__(self, ssr: nn.Module, backbone: nn.Module | None = None):
        super().__init__()
        self.ssr = ssr
        self.backbone = backbone

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.ssr(support, query)

    @torch.no_grad()
    def predict(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Predicted class index per query, from features."""
        return self.ssr(support, query).argmax(-1)

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
