"""Rendering of one glyph sample: base rendering, random augmentation, PNG bytes.

A sample is drawn on a 64 x 64 canvas (font size 48 px, centred by the ink box, scaled down
only when larger than 52 px), changed in stroke width and by an affine map there, then
box-downsampled 2x to a 32 x 32 grey image: light strokes (255) on a dark background (0).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
_HI = 2 * IMAGE_SIZE  # working canvas, downsampled 2x at the end
_EM_HI = 48  # font size on the working canvas (an em is 24 px in the output)
_MAX_GLYPH_HI = 52  # larger glyphs are scaled down to fit
_MIN_INK_KEPT = 0.35  # a thinning that keeps less ink than this is skipped


@dataclass(frozen=True)
class Aug:
    """Parameters of one rendering.

    rotation_deg: counter-clockwise rotation; scale: isotropic scale; shear: x-shear factor;
    dx, dy: translation in output pixels; stroke: -1 thinner, 0 as drawn, +1 thicker;
    occlusion: None or (side, fraction): the part of the ink box from ``side`` ("left",
    "right", "top", "bottom") covering ``fraction`` of its extent is blanked;
    noise: standard deviation (grey levels) of Gaussian pixel noise added last, drawn from
    ``noise_seed``.
    """

    rotation_deg: float = 0.0
    scale: float = 1.0
    shear: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    stroke: int = 0
    occlusion: tuple[str, float] | None = None
    noise: float = 0.0
    noise_seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
        if self.occlusion is not None:
            d["occlusion"] = [self.occlusion[0], round(self.occlusion[1], 4)]
        return d


def sample_mild_aug(rng: np.random.Generator) -> Aug:
    """The mild augmentation (retrieval renderings): rotation +-10 deg, scale 0.9-1.1,
    shear +-0.15, translation +-2 px, stroke thinner / as drawn / thicker with equal
    probability."""
    return Aug(
        rotation_deg=float(rng.uniform(-10, 10)),
        scale=float(rng.uniform(0.9, 1.1)),
        shear=float(rng.uniform(-0.15, 0.15)),
        dx=float(rng.uniform(-2, 2)),
        dy=float(rng.uniform(-2, 2)),
        stroke=int(rng.integers(-1, 2)),
    )


_SIDES = ("left", "right", "top", "bottom")


def sample_fewshot_aug(rng: np.random.Generator) -> Aug:
    """The few-shot augmentation, strong enough that one support image is often atypical of
    its class: rotation +-30 deg, scale 0.7-1.25, shear +-0.4, translation +-4 px, stroke
    thinner / as drawn / thicker, with probability 0.4 an occlusion of 20-45 % of the ink
    box from a random side, and Gaussian pixel noise of standard deviation 40 grey levels."""
    occlusion = None
    if rng.random() < 0.4:
        occlusion = (_SIDES[int(rng.integers(len(_SIDES)))], float(rng.uniform(0.2, 0.45)))
    return Aug(
        rotation_deg=float(rng.uniform(-30, 30)),
        scale=float(rng.uniform(0.7, 1.25)),
        shear=float(rng.uniform(-0.4, 0.4)),
        dx=float(rng.uniform(-4, 4)),
        dy=float(rng.uniform(-4, 4)),
        stroke=int(rng.integers(-1, 2)),
        occlusion=occlusion,
        noise=40.0,
        noise_seed=int(rng.integers(2**31)),
    )


def transform_magnitude(aug: Aug) -> float:
    """How far ``aug`` is from the identity, in units of the mild range (<= 1 inside it)."""
    return max(
        abs(aug.rotation_deg) / 10.0,
        abs(aug.scale - 1.0) / 0.1,
        abs(aug.shear) / 0.15,
        abs(aug.dx) / 2.0,
        abs(aug.dy) / 2.0,
    )


class GlyphRenderer:
    """Draws samples from font files; caches loaded fonts and base renderings.

    font_paths: font file name -> path. Base renderings are cached until ``clear()``.
    """

    def __init__(self, font_paths: dict[str, str]) -> None:
        self.font_paths = font_paths
        self._fonts: dict[str, ImageFont.FreeTypeFont] = {}
        self._bases: dict[tuple[str, str], Image.Image | None] = {}
        self._notdefs: dict[str, Image.Image | None] = {}

    def clear(self) -> None:
        self._bases.clear()

    def _font(self, name: str) -> ImageFont.FreeTypeFont:
        if name not in self._fonts:
            self._fonts[name] = ImageFont.truetype(self.font_paths[name], _EM_HI)
        return self._fonts[name]

    def _draw(self, name: str, ch: str) -> Image.Image | None:
        big = Image.new("L", (3 * _EM_HI, 3 * _EM_HI))
        ImageDraw.Draw(big).text((1.5 * _EM_HI, 1.5 * _EM_HI), ch, font=self._font(name), fill=255, anchor="mm")
        box = big.getbbox()
        if box is None:
            return None
        glyph = big.crop(box)
        w, h = glyph.size
        if max(w, h) > _MAX_GLYPH_HI:
            s = _MAX_GLYPH_HI / max(w, h)
            glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
            w, h = glyph.size
        base = Image.new("L", (_HI, _HI))
        base.paste(glyph, ((_HI - w) // 2, (_HI - h) // 2))
        return base

    def base(self, name: str, ch: str) -> Image.Image | None:
        """(64, 64) 'L' rendering of ``ch`` by font ``name`` centred by its ink box, or None
        when the font draws nothing or its .notdef box."""
        key = (name, ch)
        if key not in self._bases:
            img = self._draw(name, ch)
            if img is not None:
                if name not in self._notdefs:
                    self._notdefs[name] = self._draw(name, "\U0010fffd")
                notdef = self._notdefs[name]
                if notdef is not None and img.tobytes() == notdef.tobytes():
                    img = None
            self._bases[key] = img
        return self._bases[key]

    def render(self, name: str, ch: str, aug: Aug) -> tuple[Image.Image, float]:
        """One (32, 32) 'L' sample and the fraction of its ink removed by the occlusion."""
        base = self.base(name, ch)
        if base is None:
            raise ValueError(f"{self.font_paths[name]}: font draws no glyph for U+{ord(ch):04X}")
        img = base
        if aug.stroke != 0:
            arr = np.asarray(base)
            changed = _rank3(arr, np.maximum if aug.stroke > 0 else np.minimum)
            if aug.stroke > 0 or changed.sum(dtype=np.int64) >= _MIN_INK_KEPT * arr.sum(dtype=np.int64):
                img = Image.fromarray(changed, mode="L")
        img = img.transform(
            (_HI, _HI), Image.Transform.AFFINE, _inverse_affine(aug), resample=Image.Resampling.BILINEAR
        )
        img = img.reduce(2)
        removed = 0.0
        if aug.occlusion is not None:
            img, removed = _occlude(img, *aug.occlusion)
        if aug.noise > 0:
            noise = np.random.default_rng(aug.noise_seed).normal(0.0, aug.noise, (IMAGE_SIZE, IMAGE_SIZE))
            img = Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).round().astype(np.uint8), "L")
        return img, removed


def _rank3(arr: np.ndarray, op) -> np.ndarray:
    """3x3 grey dilation (op=np.maximum) or erosion (np.minimum) of an (H, W) uint8 image."""
    H, W = arr.shape
    pad = np.pad(arr, 1)
    rows = op(op(pad[:, 0:W], pad[:, 1 : W + 1]), pad[:, 2 : W + 2])  # (H + 2, W)
    return op(op(rows[0:H], rows[1 : H + 1]), rows[2 : H + 2])  # (H, W)


def _inverse_affine(aug: Aug) -> tuple[float, ...]:
    """PIL AFFINE data (output -> input map) of: centre, scale, shear, rotate, translate."""
    c = _HI / 2.0
    t = math.radians(aug.rotation_deg)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # y axis points down
    lin = rot @ np.array([[1.0, aug.shear], [0.0, 1.0]]) * aug.scale
    (a, b), (c2, d) = lin
    inv = np.array([[d, -b], [-c2, a]]) / (a * d - b * c2)
    shift = np.array([c + 2.0 * aug.dx, c + 2.0 * aug.dy])  # output pixels are 2 working pixels
    offset = np.array([c, c]) - inv @ shift
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def _occlude(img: Image.Image, side: str, fraction: float) -> tuple[Image.Image, float]:
    arr = np.array(img)
    box = img.getbbox()
    if box is None:
        return img, 0.0
    x0, y0, x1, y1 = box
    before = float(arr.sum())
    if side == "left":
        arr[:, : x0 + round((x1 - x0) * fraction)] = 0
    elif side == "right":
        arr[:, x1 - round((x1 - x0) * fraction) :] = 0
    elif side == "top":
        arr[: y0 + round((y1 - y0) * fraction), :] = 0
    elif side == "bottom":
        arr[y1 - round((y1 - y0) * fraction) :, :] = 0
    else:
        raise ValueError(f"occlusion side must be left/right/top/bottom, got {side!r}")
    return Image.fromarray(arr, mode="L"), 1.0 - float(arr.sum()) / max(before, 1.0)


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding without ancillary chunks (no time stamp), so equal images give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
