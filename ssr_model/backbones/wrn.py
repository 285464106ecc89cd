"""WRN-28-10 backbone in the classic WideResNet layout used by SIB / SSR checkpoints.

State dict layout (pre-activation basic blocks, 4 per group, widths 160 / 320 / 640)::

    conv1.weight                                          (16, C_in, 3, 3)
    block{1,2,3}.layer.{0..3}.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    block{1,2,3}.layer.{0..3}.conv1.weight
    block{1,2,3}.layer.{0..3}.bn2.*
    block{1,2,3}.layer.{0..3}.conv2.weight
    block{1,2,3}.layer.0.convShortcut.weight              (only where in != out: layer 0)
    bn1.*                                                 final BN before ReLU + pooling

All convolutions are bias-free. The first group has stride 1 on CIFAR-size inputs
(``image_size <= 32``, SIB's ``isCifar``) and stride 2 otherwise; groups 2 and 3 have
stride 2. The output is the global average of the final map: 640 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "wrn_feature_dim"]


def wrn_feature_dim(image_size: int, widen_factor: int = 10) -> int:
    """Feature size of :class:`WideResNet` (independent of the image size)."""
    return 64 * widen_factor


class _BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus (projected) shortcut.

    When in != out the pre-activated input also feeds the 1x1 ``convShortcut``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.relu2(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _NetworkBlock(nn.Module):
    """A group of ``n_blocks`` basic blocks in ``self.layer`` (first block may stride)."""

    def __init__(self, n_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor feature extractor (default WRN-28-10).

    Args:
        image_size: input side in pixels; <= 32 gives the first group stride 1.
        in_channels: image channels (3 for RGB, 1 for grey).
        depth, widen_factor: (depth - 4) must be divisible by 6.
        drop_rate: dropout inside blocks (0 in SIB / SSR).

    Forward: images (B, in_channels, H, W) -> features (B, 64 * widen_factor).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wrn: depth {depth} invalid, expected depth = 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        first_stride = 1 if image_size <= 32 else 2
        self.image_size = image_size
        self.out_dim = widths[3]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], first_stride, drop_rate)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> globally average-pooled features (B, out_dim)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return out.mean(dim=(2, 3))
