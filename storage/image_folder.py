"""Few-shot on a user's image folder ``<root>/{train,val,test}/<class>/<image>``.

Any format Pillow opens, of any size and mode (RGB, RGBA, L, P, CMYK, ...): every image is
converted to RGB (``Image.convert``: alpha is dropped, palettes and CMYK are mapped) and
read through the same code as the paper's data sets (:func:`storage.fewshot.list_split`,
:func:`storage.fewshot.load_images`) with the spec :func:`image_folder_spec` returns:

- test transforms: resize to ``image_size`` x ``image_size`` (bilinear; the aspect ratio
  is not kept, so no part of an image is cropped away), no centre crop;
- training augmentation: tiered-ImageNet's, RandomResizedCrop(``image_size``) of the
  original image (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip. It suits photos of
  any size; it is the wrong choice where a mirror image is another class (characters).
- normalisation ``(x - mean) / std`` per channel with x in [0, 1]: ``auto`` (default)
  computes mean and std over the train split's images, resized as above (pixels of every
  image count equally), once, cached in ``cache_dir`` (never in the user's folder);
  ``imagenet`` (torchvision's ImageNet values); or explicit numbers, ``"m,s"`` (one mean
  and one std for all three channels) or ``"m1,m2,m3,s1,s2,s3"``, on the [0, 1] scale.

A file in a class folder that is not an image (by extension, :data:`IMAGE_EXTENSIONS`)
or that Pillow cannot read is an error naming the file, never skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage.atomic import atomic_write_text
from storage.augment import TrainTransform
from storage.errors import CorruptFileError, DatasetLayoutError, DataValueError
from storage.fewshot import IMAGE_EXTENSIONS, DatasetSpec, SplitIndex, list_split

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_VERSION = "1"
RGB = tuple[float, float, float]  # one value per channel


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and std (3,) on the [0, 1] scale over n_images images."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_images: int


def list_image_folder(root: str | os.PathLike) -> dict[str, SplitIndex]:
    """Index the three splits of ``root`` (:func:`storage.fewshot.list_split`): every split
    needs class folders with images. A file in a class folder whose extension is not an
    image one is a DatasetLayoutError naming it (list_split would leave it out)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: image folder not found (expected <root>/{{train,val,test}}/<class>/<image>)")
    out = {}
    for split in SPLITS:
        index = list_split(root, split)
        for class_name in index.classes:
            for f in sorted((index.root / class_name).iterdir()):
                if f.is_file() and not f.name.startswith(".") and not f.name.lower().endswith(IMAGE_EXTENSIONS):
                    raise DatasetLayoutError(
                        f"{f}: not an image file (expected extensions {', '.join(IMAGE_EXTENSIONS)}); "
                        "remove or convert it"
                    )
        out[split] = index
    return out


def parse_normalization(value: str) -> tuple[RGB, RGB] | None:
    """``auto`` -> None (computed); ``imagenet`` -> ImageNet mean/std; ``"m,s"`` or
    ``"m1,m2,m3,s1,s2,s3"`` -> those numbers (on the [0, 1] scale, std > 0). Anything else
    is a ValueError saying what is accepted."""
    text = value.strip().lower()
    if text == "auto":
        return None
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    expected = "expected 'auto', 'imagenet', 'm,s' or 'm1,m2,m3,s1,s2,s3' (numbers on the [0, 1] scale)"
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"normalization: {value!r} is not understood; {expected}") from None
    if len(numbers) == 2:
        mean, std = (numbers[0],) * 3, (numbers[1],) * 3
    elif len(numbers) == 6:
        mean, std = (numbers[0], numbers[1], numbers[2]), (numbers[3], numbers[4], numbers[5])
    else:
        raise ValueError(f"normalization: {value!r} has {len(numbers)} numbers; {expected}")
    if not all(math.isfinite(v) for v in numbers) or min(std) <= 0:
        raise ValueError(f"normalization: {value!r}: std must be > 0 and every number finite; {expected}")
    if max(abs(v) for v in numbers) > 1.0:
        raise ValueError(
            f"normalization: {value!r}: numbers above 1 look like the 0-255 scale; divide them by 255 ({expected})"
        )
    return mean, std


def _open_rgb(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) float64 in [0, 1]: the image converted to RGB and resized."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable image ({exc})") from exc
    return np.asarray(rgb, dtype=np.float64) / 255.0


def stats_key(index: SplitIndex, image_size: int) -> str:
    """16 hex digits of the split's file list (path, size, ns mtime) and ``image_size``."""
    h = hashlib.sha256(f"v{STATS_VERSION}|{index.root.resolve()}|{image_size}".encode())
    for rel in index.paths:
        st = (index.root / rel).stat()
        h.update(f"\n{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def channel_stats(index: SplitIndex, image_size: int, cache_dir: str | os.PathLike | None = None) -> ChannelStats:
    """Per-channel mean and std of a split's images, converted to RGB and resized to
    ``image_size`` square, streamed one image at a time (sums in float64).

    With ``cache_dir`` the result is kept in ``<cache_dir>/image-stats-<key>.json``
    (:func:`stats_key`) and reused. A channel with std 0 (every pixel equal) is a
    DataValueError."""
    cache = Path(cache_dir) / f"image-stats-{stats_key(index, image_size)}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            obj = json.loads(cache.read_text(encoding="utf-8"))
            return ChannelStats(tuple(obj["mean"]), tuple(obj["std"]), int(obj["n_images"]))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is recomputed and replaced
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for rel in index.paths:
        x = _open_rgb(index.root / rel, image_size).reshape(-1, 3)
        total += x.sum(axis=0)
        total_sq += np.square(x).sum(axis=0)
    n_pixels = len(index.paths) * image_size * image_size
    mean = total / n_pixels
    std = np.sqrt(np.maximum(total_sq / n_pixels - np.square(mean), 0.0))
    if (std < 1e-6).any():
        c = int(np.argmin(std))
        raise DataValueError(
            f"{index.root}: channel {c} has the same value in every pixel of the split "
            "(std 0); give normalization explicitly"
        )
    stats = ChannelStats(
        (float(mean[0]), float(mean[1]), float(mean[2])),
        (float(std[0]), float(std[1]), float(std[2])),
        len(index.paths),
    )
    if cache is not None:
        atomic_write_text(
            cache,
            json.dumps(
                {
                    "mean": stats.mean,
                    "std": stats.std,
                    "n_images": stats.n_images,
                    "image_size": image_size,
                    "split": str(index.root.resolve()),
                }
            ),
        )
    return stats


def image_folder_spec(
    root: str | os.PathLike,
    image_size: int = 84,
    normalization: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> DatasetSpec:
    """The DatasetSpec of a user's image folder (module docstring): 3 channels,
    ``image_size`` square, resize without crop, RandomResizedCrop + flip for training,
    mean/std from ``normalization``. Checks the folder layout (:func:`list_image_folder`);
    ``auto`` reads every train image once (then cached in ``cache_dir``, when given)."""
    if image_size < 8:
        raise ValueError(f"image_size: expected at least 8 pixels, got {image_size}")
    splits = list_image_folder(root)
    parsed = parse_normalization(normalization)
    if parsed is None:
        stats = channel_stats(splits["train"], image_size, cache_dir)
        mean, std = stats.mean, stats.std
    else:
        mean, std = parsed
    return folder_spec(image_size, mean, std)


def folder_spec(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> DatasetSpec:
    """The DatasetSpec of an image folder from its fields (named ``image-folder``): 3
    channels, resize to ``image_size`` square without crop, RandomResizedCrop + flip for
    training, per-channel ``mean`` / ``std`` (3 each, [0, 1] scale). What
    :func:`image_folder_spec` returns, rebuilt from stored values."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image folder spec: expected 3 means and 3 stds, got {len(mean)} and {len(std)}")
    return DatasetSpec(
        name="image-folder",
        image_size=image_size,
        channels=3,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(v) for v in std),
        train=TrainTransform("random-resized", image_size, flip=True),
        resize=(image_size, image_size),
        center_crop=None,
    )


def verify_images(index: SplitIndex) -> None:
    """Decode every image of a split (streamed); the first one Pillow cannot read is a
    CorruptFileError naming it. For a check before a long run; loading does it anyway."""
    for rel in index.paths:
        path = index.root / rel
        try:
            with Image.open(path) as img:
                img.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CorruptFileError(f"{path}: not a readable image ({exc})") from exc
