"""Few-shot backbones with SIB / SSR checkpoint key layouts, and a cosine classifier.

``build_backbone(name, image_size, in_channels)`` returns a module mapping images
(B, in_channels, image_size, image_size) to features (B, feature_dim(name, image_size)).
"""

from __future__ import annotations

from torch import nn

from .classifier import CosineClassifier
from .conv4 import Conv4, conv4_feature_dim
from .resnet12 import ResNet12, resnet12_feature_dim
from .wrn import WideResNet, wrn_feature_dim

__all__ = [
    "BACKBONE_NAMES",
    "Conv4",
    "CosineClassifier",
    "ResNet12",
    "WideResNet",
    "build_backbone",
    "feature_dim",
]

BACKBONE_NAMES = ("conv4-64", "resnet12", "wrn-28-10")


def _check_name(name: str) -> None:
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}, expected one of {', '.join(BACKBONE_NAMES)}")


def feature_dim(name: str, image_size: int) -> int:
    """Feature size of backbone ``name`` on square ``image_size`` inputs.

    conv4-64: 256 at 32 px, 1600 at 80/84 px; resnet12: 2560 / 16000; wrn-28-10: 640.
    """
    _check_name(name)
    if name == "conv4-64":
        return conv4_feature_dim(image_size)
    if name == "resnet12":
        return resnet12_feature_dim(image_size)
    return wrn_feature_dim(image_size)


def build_backbone(name: str, image_size: int, in_channels: int = 3) -> nn.Module:
    """Backbone ``name`` in {"conv4-64", "resnet12", "wrn-28-10"}; ``.out_dim`` is its feature size."""
    _check_name(name)
    if name == "conv4-64":
        return Conv4(image_size, in_channels)
    if name == "resnet12":
        return ResNet12(image_size, in_channels)
    return WideResNet(image_size, in_channels, depth=28, widen_factor=10)
