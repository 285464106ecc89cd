"""Conv-4-64 backbone (four conv3x3(64)-BN-ReLU-maxpool2 blocks, flattened map).

State dict layout (as in the SIB / SSR ``ConvNet_4_64`` checkpoints)::

    conv_blocks.{0,1,2,3}.layers.Conv.weight            (64, C_in, 3, 3), no bias
    conv_blocks.{0,1,2,3}.layers.BatchNorm.{weight,bias,running_mean,running_var,num_batches_tracked}

The released SSR Conv-4-64 omits the ReLU of the fourth block (``last_relu=False``, the
default here); SIB's original applies it. The ReLU has no parameters, so both variants load
the same checkpoints. Feature dim = 64 * floor(s/16)^2 for an s x s image
(32 px -> 256, 80 or 84 px -> 1600).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv4", "conv4_feature_dim"]


def conv4_feature_dim(image_size: int, width: int = 64) -> int:
    """Flattened feature size of :class:`Conv4` on ``image_size`` x ``image_size`` inputs."""
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(f"conv4-64: image_size {image_size} is too small, expected >= 16")
    return width * side * side


class _ConvBlock(nn.Module):
    """conv3x3 - BN - (ReLU) - maxpool2, held in ``self.layers`` with named children."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential()
        self.layers.add_module("Conv", nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False))
        self.layers.add_module("BatchNorm", nn.BatchNorm2d(out_channels))
        if relu:
            self.layers.add_module("ReLU", nn.ReLU(inplace=True))
        self.layers.add_module("MaxPool", nn.MaxPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Conv4(nn.Module):
    """Conv-4-64 feature extractor.

    Args:
        image_size: input side length in pixels (square images), used for ``out_dim``.
        in_channels: image channels (3 for RGB, 1 for the built-in grey dataset).
        width: filters per block (64).
        last_relu: apply ReLU in the fourth block (False in the released SSR model).

    Forward: images (B, in_channels, H, W) -> features (B, out_dim).
    """

    def __init__(self, image_size: int, in_channels: int = 3, width: int = 64, last_relu: bool = False) -> None:
        super().__init__()
        self.image_size = image_size
        self.out_dim = conv4_feature_dim(image_size, width)
        blocks = [_ConvBlock(in_channels if i == 0 else width, width, relu=(i < 3 or last_relu)) for i in range(4)]
        self.conv_blocks = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> flattened features (B, 64 * (H//16) * (W//16))."""
        B = x.shape[0]
        return self.conv_blocks(x).reshape(B, -1)
