"""DNI network: the synthetic-gradient MLP of SSR (SSR_METHOD.md section 2).

The module keeps the authors' layer layout so that their released state dicts load
without renaming::

    layer1 = [InstanceNorm1d(1, affine) (layer1.0), Linear(d_in, h) (layer1.1), ReLU,
              InstanceNorm1d(1, affine) (layer1.3)]
    layer2 = [Linear(h, h) (layer2.0), ReLU, InstanceNorm1d(1, affine) (layer2.2)]
    layer3 = Linear(h, d_in)

Every instance norm treats one row as a single channel of length ``d`` and normalises it
over its own entries (biased variance, eps 1e-5, then a scalar affine), so a row's output
never depends on other rows. The forward pass does not route rows through ``nn.InstanceNorm1d`` (which needs a
(N, 1, d) view and runs a batch norm over N channels with a repeated weight); it calls
``F.layer_norm`` over the last axis with the registered (1,) weight and bias expanded to
(d,) (stride-0 views, no copy). Same formula (biased variance, eps inside the square
root); equal to ``nn.InstanceNorm1d`` up to float rounding, and measured 3-4x faster on
CPU for (1616, 1024) and (640, 4096) inputs.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DNI", "row_instance_norm"]


def row_instance_norm(x: torch.Tensor, norm: nn.InstanceNorm1d) -> torch.Tensor:
    """Instance-normalise every row of ``x`` over its last axis with ``norm``'s parameters.

    Args:
        x: rows of shape (..., d).
        norm: an ``nn.InstanceNorm1d(1, affine=True)``; its weight and bias have shape (1,).

    Returns:
        Tensor of shape (..., d), equal to ``norm(x.reshape(-1, 1, d)).reshape(x.shape)``.
    """
    d = x.shape[-1]
    return F.layer_norm(x, (d,), norm.weight.expand(d), norm.bias.expand(d), eps=norm.eps)


class DNI(nn.Module):
    """Synthetic-gradient MLP mapping subgraph vectors to their upstream gradients.

    Args:
        d_in: input and output width (length of one subgraph vector).
        hidden: hidden width ``h``.
        device, dtype: forwarded to the parameters.

    Forward:
        x: rows of shape (..., d_in); each row is processed independently.
        returns: tensor of shape (..., d_in).
    """

    def __init__(self, d_in: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_in = d_in
        self.hidden = hidden
        self.layer1 = nn.Sequential(
            nn.InstanceNorm1d(1, affine=True, **factory),
            nn.Linear(d_in, hidden, **factory),
            nn.ReLU(),
            nn.InstanceNorm1d(1, affine=True, **factory),
        )
        self.layer2 = nn.Sequential(
            nn.Linear(hidden, hidden, **factory),
            nn.ReLU(),
            nn.InstanceNorm1d(1, affine=True, **factory),
        )
        self.layer3 = nn.Linear(hidden, d_in, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"DNI input: expected last dim d_in={self.d_in}, got shape {tuple(x.shape)}")
        norm_in, fc1, _, norm1 = self.layer1
        fc2, _, norm2 = self.layer2
        inplace = not torch.is_grad_enabled()  # the ReLU may overwrite its input at inference
        h = row_instance_norm(x, cast(nn.InstanceNorm1d, norm_in))
        h = row_instance_norm(F.relu(fc1(h), inplace=inplace), cast(nn.InstanceNorm1d, norm1))
        h = row_instance_norm(F.relu(fc2(h), inplace=inplace), cast(nn.InstanceNorm1d, norm2))
        return self.layer3(h)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, hidden={self.hidden}"
