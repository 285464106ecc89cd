"""ResNet-12 backbone (widths 64-160-320-640, no final pooling, flattened map).

Layout of the TADAM / MetaOptNet ResNet-12 used by the SSR release (``resnet12.py``): four
residual stages, each one block of three conv3x3-BN with LeakyReLU(0.1), a 1x1-conv + BN
projection shortcut, then LeakyReLU and a 2x2 max-pool. State dict keys::

    layer{1,2,3,4}.0.conv1.weight, .bn1.*, .conv2.weight, .bn2.*, .conv3.weight, .bn3.*
    layer{1,2,3,4}.0.downsample.0.weight      (1x1 conv, no bias)
    layer{1,2,3,4}.0.downsample.1.*           (BatchNorm2d)

Feature dim = 640 * floor(s/16)^2 (32 px -> 2560, 80 or 84 px -> 16000). DropBlock (stages 3
and 4) and dropout (stages 1 and 2) are active only in training mode and hold no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNet12", "resnet12_feature_dim"]

_WIDTHS = (64, 160, 320, 640)


def resnet12_feature_dim(image_size: int) -> int:
    """Flattened feature size of :class:`ResNet12` on ``image_size`` x ``image_size`` inputs."""
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(f"resnet12: image_size {image_size} is too small, expected >= 16")
    return _WIDTHS[-1] * side * side


def drop_block(x: torch.Tensor, drop_prob: float, block_size: int) -> torch.Tensor:
    """DropBlock (Ghiasi et al. 2018): zero random block_size x block_size squares.

    x: (B, C, H, W). The kept activations are rescaled so the expected sum is unchanged.
    Uses the global torch RNG, like ``F.dropout``.
    """
    B, C, H, W = x.shape
    bs = min(block_size, H, W)
    if drop_prob <= 0.0 or bs < 1:
        return x
    valid = (H - bs + 1) * (W - bs + 1)
    gamma = drop_prob / (bs * bs) * (H * W) / valid
    seeds = (torch.rand(B, C, H - bs + 1, W - bs + 1, device=x.device) < gamma).to(x.dtype)
    pad = (bs - 1, bs - 1, bs - 1, bs - 1)
    # a seed at (i, j) drops the square [i, i+bs) x [j, j+bs)
    dropped = F.max_pool2d(F.pad(seeds, pad), kernel_size=bs, stride=1)[:, :, :H, :W]
    keep = 1.0 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class _Block(nn.Module):
    """Three conv3x3-BN (LeakyReLU 0.1 between), projection shortcut, LeakyReLU, maxpool 2."""

    def __init__(self, in_planes: int, planes: int, drop_rate: float, block_size: int, use_drop_block: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, 1, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(2)
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.use_drop_block = use_drop_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if self.training and self.drop_rate > 0:
            if self.use_drop_block:
                out = drop_block(out, self.drop_rate, self.block_size)
            else:
                out = F.dropout(out, p=self.drop_rate, training=True)
        return out


class ResNet12(nn.Module):
    """ResNet-12 feature extractor without pooling.

    Args:
        image_size: input side in pixels (square), used for ``out_dim``.
        in_channels: image channels (3 for RGB, 1 for grey).
        drop_rate: dropout / DropBlock rate during training (SSR trains with 0.1).
        drop_block_size: DropBlock size in stages 3 and 4 (SSR: 5 for mini/tiered, 2 for CIFAR-FS).

    Forward: images (B, in_channels, H, W) -> features (B, 640 * (H//16) * (W//16)).
    """

    layer1: nn.Sequential  # submodules (add_module in __init__)
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, image_size: int, in_channels: int = 3, drop_rate: float = 0.0, drop_block_size: int = 5) -> None:
        super().__init__()
        self.image_size = image_size
        self.out_dim = resnet12_feature_dim(image_size)
        in_planes = in_channels
        for i, planes in enumerate(_WIDTHS):
            block = _Block(in_planes, planes, drop_rate, drop_block_size, use_drop_block=i >= 2)
            self.add_module(f"layer{i + 1}", nn.Sequential(block))
            in_planes = planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> flattened features (B, out_dim)."""
        B = x.shape[0]
        out = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return out.reshape(B, -1)
