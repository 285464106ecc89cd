"""Backbone and SSR checkpoints: read with ``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from storage.atomic import atomic_path
from storage.errors import CorruptFileError, SchemaError, StorageError, UnsafePickleError
from storage.hashing import file_sha256

__all__ = [
    "RELEASED_BACKBONES",
    "load_state_dict",
    "load_ssr_checkpoint",
    "released_backbone",
    "save_checkpoint",
    "file_sha256",
]

SSR_KEYS = ("netFeat", "SSR", "nbStep")

# The backbones of ``ssr data download fewshot-backbones`` (and ``-tiered``), by (dataset,
# backbone), relative to ``<data root>/backbones``: the files the authors' run scripts use.
RELEASED_BACKBONES: dict[tuple[str, str], str] = {
    ("cifar-fs", "conv4-64"): "CIFAR-FS/Conv4_64_Cos_netFeatBest.pth",
    ("cifar-fs", "resnet12"): "CIFAR-FS/ResNet12_Cos_netFeatBest.pth",
    ("cifar-fs", "wrn-28-10"): "CIFAR-FS/WRN_Cos_netFeatBest62.561.pth",
    ("mini-imagenet", "conv4-64"): "MiniImageNet/Conv4_64_Cos_netFeatBest.pth",
    ("mini-imagenet", "resnet12"): "MiniImageNet/ResNet12_Cos_netFeatBest.pth",
    ("mini-imagenet", "wrn-28-10"): "MiniImageNet/WRN_Cos_netFeatBest64.653.pth",
    ("tiered-imagenet", "conv4-64"): "TieredImageNet/tieredImageNet_ConvNet.pth",
    ("tiered-imagenet", "resnet12"): "TieredImageNet/tieredImageNet_ResNet12.pth",
    ("tiered-imagenet", "wrn-28-10"): "TieredImageNet/tieredImageNet_WRN.pth",
}


def _torch_load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses arbitrary globals with an UnpicklingError
        if "weights_only" in str(exc) or "global" in str(exc).lower():
            raise UnsafePickleError(
                f"{path}: checkpoint needs objects beyond tensors and containers; "
                f"refusing to load it ({str(exc).splitlines()[0]})"
            ) from exc
        raise CorruptFileError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc


def _clean_state_dict(obj: Any, source: str, field: str = "state_dict") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise SchemaError(f"{source}: {field} must be a non-empty dict of tensors, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise SchemaError(f"{source}: {field} entry {key!r} is {type(value).__name__}, expected a tensor")
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


def released_backbone(backbones_root: str | os.PathLike, dataset: str, backbone: str) -> Path:
    """The authors' released backbone of ``backbone`` for ``dataset`` under ``backbones_root``
    (where ``ssr data download fewshot-backbones`` puts them); errors say what to download."""
    rel = RELEASED_BACKBONES.get((dataset, backbone))
    if rel is None:
        known = sorted({d for d, _ in RELEASED_BACKBONES})
        raise StorageError(
            f"no released {backbone} backbone for dataset '{dataset}' (released for: {', '.join(known)})"
        )
    path = Path(backbones_root) / rel
    if not path.is_file():
        source = "fewshot-backbones-tiered" if dataset == "tiered-imagenet" else "fewshot-backbones"
        raise StorageError(
            f"{path}: released backbone not found (run `ssr data download {source} "
            f"--root {Path(backbones_root).parent}`)"
        )
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``path``: unwraps ``{"state_dict": ...}`` and strips the
    ``module.`` prefix DataParallel adds."""
    return _clean_state_dict(_torch_load(path), os.fspath(path))


def load_ssr_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The authors' SSR checkpoint ``{"netFeat": state_dict, "SSR": state_dict, "nbStep": int}``."""
    source = os.fspath(path)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise SchemaError(f"{source}: expected a dict with keys {list(SSR_KEYS)}, got {type(obj).__name__}")
    missing = [k for k in SSR_KEYS if k not in obj]
    if missing:
        raise SchemaError(f"{source}: missing key(s) {missing} (expected {list(SSR_KEYS)}, found {sorted(obj)})")
    step = obj["nbStep"]
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise SchemaError(f"{source}: nbStep is {step!r}, expected a positive int")
    return {
        "netFeat": _clean_state_dict(obj["netFeat"], source, "netFeat"),
        "SSR": _clean_state_dict(obj["SSR"], source, "SSR"),
        "nbStep": step,
    }


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
