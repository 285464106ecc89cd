"""Where the pipeline computes: the one rule turning ``params.device`` into a device.

``"auto"`` means the GPU when there is one, ``"cpu"`` always the CPU, and ``"cuda"`` the
GPU or a clear error. The rule is applied to what is there: the local torch for work
done in the pipeline's own process (backbone pretraining, feature extraction), the Ray
cluster's resources for trials and actors (asking Ray for a GPU that is not there hangs).
Every consumer receives the resolved ``"cpu"`` / ``"cuda"`` string and follows it.
"""

from __future__ import annotations

import torch

from ssr_tasks.config import Device
from ssr_tasks.services import cluster_has_gpu


def resolve_device(requested: Device, gpu_available: bool, where: str) -> str:
    """``requested`` ("auto" | "cpu" | "cuda") -> "cpu" or "cuda"; ``where`` names what was asked."""
    if requested == "cuda" and not gpu_available:
        raise ValueError(f"device: 'cuda' was asked for but {where} has no CUDA device")
    if requested == "auto":
        return "cuda" if gpu_available else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {requested!r}")
    return requested


def local_device(requested: Device) -> str:
    """The device for work in this process."""
    return resolve_device(requested, torch.cuda.is_available(), "torch in the flow process")


def cluster_device(requested: Device) -> str:
    """The device of Ray trials and actors (one GPU each when "cuda")."""
    return resolve_device(requested, cluster_has_gpu(), "the Ray cluster")
