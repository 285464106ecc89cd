"""Training-time image augmentation of the few-shot datasets, as the SSR authors apply it
(their ``src/dataset.py``) before the frozen backbone, written on PIL with a numpy
``Generator`` so that a seed gives the same views.

- CIFAR-FS: RandomCrop(32, padding 4), horizontal flip, ColorJitter(0.4, 0.4, 0.4);
- mini-ImageNet: RandomCrop(80, padding 8), horizontal flip, ColorJitter(0.4, 0.4, 0.4);
- tiered-ImageNet: RandomResizedCrop(84), horizontal flip;
- glyphs (built-in): RandomCrop(32, padding 4) only (a mirrored character is another one).

Semantics follow torchvision's PIL code paths: zero padding; crop offsets uniform over
the valid range; flip with probability 1/2; the jitter factors uniform in
``[1 - j, 1 + j]``, applied in a random order with PIL's ``ImageEnhance`` (Brightness,
Contrast, Color); RandomResizedCrop with scale (0.08, 1), ratio (3/4, 4/3), ten tries,
then the centre crop fallback, resized bilinearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


@dataclass(frozen=True)
class TrainTransform:
    """One dataset's training augmentation.

    crop: "random" (RandomCrop(size, padding)) or "random-resized" (RandomResizedCrop(size));
    size: output side in pixels; padding: zero padding of "random" on every side;
    flip: random horizontal flip; jitter: brightness = contrast = saturation strength
    (0 disables ColorJitter).
    """

    crop: Literal["random", "random-resized"]
    size: int
    padding: int = 0
    flip: bool = True
    jitter: float = 0.0


def _uniform_int(rng: np.random.Generator, high_inclusive: int) -> int:
    return int(rng.integers(0, high_inclusive + 1))


def random_crop(img: Image.Image, size: int, padding: int, rng: np.random.Generator) -> Image.Image:
    """Pad by ``padding`` zeros on each side, then a ``size`` square at a uniform offset."""
    if padding:
        img = ImageOps.expand(img, border=padding, fill=0)
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"random crop {size} is larger than the padded image {w}x{h}")
    top, left = _uniform_int(rng, h - size), _uniform_int(rng, w - size)
    return img.crop((left, top, left + size, top + size))


def _resized_crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = w * h
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = _uniform_int(rng, h - ch), _uniform_int(rng, w - cw)
            return left, top, cw, ch
    in_ratio = w / h  # fallback: the largest centred crop with a ratio inside the range
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random area (8-100 %) and aspect ratio (3/4-4/3) crop, resized to ``size`` square."""
    left, top, cw, ch = _resized_crop_box(img.size[0], img.size[1], rng)
    return img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.Resampling.BILINEAR)


def color_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], in a random order."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    order = rng.permutation(len(enhancers))
    factors = [float(rng.uniform(lo, hi)) for _ in enhancers]
    for i in order:
        img = enhancers[i](img).enhance(factors[i])
    return img


def augment(img: Image.Image, t: TrainTransform, rng: np.random.Generator) -> Image.Image:
    """Crop, flip and jitter ``img`` as ``t`` says; returns a ``t.size`` square image."""
    if t.crop == "random":
        img = random_crop(img, t.size, t.padding, rng)
    else:
        img = random_resized_crop(img, t.size, rng)
    if t.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if t.jitter > 0:
        img = color_jitter(img, t.jitter, rng)
    return img
