"""Cosine classifier head for pretraining backbones on the base classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosineClassifier"]


class CosineClassifier(nn.Module):
    """logits = scale * cos(feature, class weight), both L2-normalised.

    Args:
        feat_dim: feature size D.
        n_classes: number of base classes C.
        scale: initial temperature (10.0).
        learn_scale: make the scale a trainable parameter.

    Forward: features (B, D) -> logits (B, C).
    """

    def __init__(self, feat_dim: int, n_classes: int, scale: float = 10.0, learn_scale: bool = True) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.n_classes = n_classes
        self.weight = nn.Parameter(torch.randn(n_classes, feat_dim) * (2.0 / feat_dim) ** 0.5)
        scale_t = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            self.register_buffer("scale", scale_t)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) -> logits (B, C)."""
        B, D = features.shape
        if D != self.feat_dim:
            raise ValueError(f"CosineClassifier: features have dim {D}, expected {self.feat_dim}")
        cos = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()
        return self.scale * cos
