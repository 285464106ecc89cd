"""Font discovery and the pool of character classes for the built-in glyph dataset.

The fonts are the TrueType files shipped inside matplotlib's package
(``matplotlib/mpl-data/fonts/ttf``). A character is a candidate class when at least
``MIN_FONTS`` font files draw it with a real glyph; look-alike characters (Latin ``A``,
Greek ``Α``, Cyrillic ``А``) are reduced to one class. Nothing here is computed at import.
"""

from __future__ import annotations

import importlib.util
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fontTools import agl
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

MIN_FONTS = 10
# Fonts that draw a placeholder for every code point (LastResort) are never used.
_EXCLUDED_FONTS = ("LastResort",)
# Families, by file-name prefix (longest prefix wins). Used by the retrieval ground truth.
_FAMILIES = (
    ("DejaVuSansMono", "dejavu-sans-mono"),
    ("DejaVuSans", "dejavu-sans"),
    ("DejaVuSerif", "dejavu-serif"),
    ("STIX", "stix"),
    ("cmr10", "cm-roman"),
    ("cmb10", "cm-roman"),
    ("cmti10", "cm-roman"),
    ("cmmi10", "cm-roman"),
    ("cmss10", "cm-sans"),
    ("cmtt10", "cm-typewriter"),
    ("cmsy10", "cm-symbol"),
    ("cmex10", "cm-extension"),
)
# Fonts in matplotlib's Computer Modern set reuse ASCII code points for other glyphs (TeX
# encodings); a code point counts only when its glyph name names exactly that character.
_TEX_ENCODED_PREFIX = "cm"
# Reference fonts for the visual signature, first one that covers the character wins.
_REFERENCE_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf", "DejaVuSansMono.ttf")
# Cross-script homoglyphs by name: each entry's characters after the first are dropped
# when the first is a candidate (the rendering check catches the rest).
_HOMOGLYPHS = (
    "AΑА",
    "BΒВ",
    "CϹС",
    "EΕЕ",
    "HΗН",
    "IΙІӀ",
    "JЈ",
    "KΚК",
    "MΜМ",
    "NΝ",
    "OΟО",
    "PΡР",
    "SЅ",
    "TΤТ",
    "XΧХ",
    "YΥҮ",
    "ZΖ",
    "aа",
    "cϲс",
    "eе",
    "hһ",
    "iі",
    "jј",
    "oοо",
    "pр",
    "sѕ",
    "xх",
    "yу",
    "ÄӒ",
    "ÖӦ",
    "ËЁ",
    "äӓ",
    "öӧ",
    "ëё",
    "ÏЇ",
    "ïї",
)
SIGNATURE_PX = 24  # font size of the look-alike signature rendering
SIGNATURE_CANVAS = 48  # canvas the signature is centred in (then 2x2 box-averaged to 24x24)
# Two characters are look-alikes when ||a - b||^2 / (||a||^2 + ||b||^2) of their signatures
# is below this (0 for the same glyph; Latin l / capital I in DejaVu Sans: 0.015,
# e-acute / e-grave: 0.046, x / X: 0.17, o / O: 0.75).
LOOKALIKE_DISTANCE = 0.02


@dataclass(frozen=True)
class FontFile:
    """One usable font file: path, file name, family and the characters it draws."""

    path: str
    name: str
    family: str
    chars: frozenset[str]


@dataclass(frozen=True)
class GlyphClass:
    """A candidate class: the character and the names of the font files that draw it."""

    char: str
    fonts: tuple[str, ...]

    @property
    def folder(self) -> str:
        """Filesystem-safe class name, e.g. ``U+0041``."""
        return class_folder(self.char)


def class_folder(char: str) -> str:
    """``'A'`` -> ``'U+0041'``."""
    return f"U+{ord(char):04X}"


def font_dir() -> Path:
    """The folder of TrueType files inside the installed matplotlib package (not imported)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("matplotlib is not installed: its bundled fonts are the glyph dataset's source")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


def family_of(font_name: str) -> str:
    """Family of a font file name (``DejaVuSans-Bold.ttf`` -> ``dejavu-sans``)."""
    best = max((p for p, _ in _FAMILIES if font_name.startswith(p)), key=len, default=None)
    if best is None:
        return font_name.rsplit(".", 1)[0].lower()
    return dict(_FAMILIES)[best]


def _is_candidate_char(ch: str) -> bool:
    cat = unicodedata.category(ch)
    if cat[0] not in "LNPS" or ch.isspace() or not ch.isprintable():
        return False
    # Compatibility characters (ligatures, full-width, super/subscripts, math alphanumerics,
    # Kelvin/Ohm signs, ...) are renderings of another character: not a class of their own.
    return unicodedata.normalize("NFKC", ch) == ch


def load_fonts(directory: Path | None = None) -> list[FontFile]:
    """Read the cmap of every ``*.ttf`` file and keep the code points with a real glyph.

    A code point counts when it maps to a glyph other than ``.notdef``; for the TeX-encoded
    Computer Modern files (``cm*.ttf``, whose cmaps reuse ASCII code points for other glyphs)
    the glyph name must name exactly that character in the Adobe glyph list.
    """
    directory = font_dir() if directory is None else Path(directory)
    fonts = [f for f in (_load_font(p) for p in sorted(directory.glob("*.ttf"))) if f is not None]
    if not fonts:
        raise FileNotFoundError(f"{directory}: no usable *.ttf font files (expected matplotlib's mpl-data fonts)")
    return fonts


def _load_font(path: Path) -> FontFile | None:
    if path.name.startswith(_EXCLUDED_FONTS):
        return None
    tt = TTFont(str(path), lazy=True)
    try:
        cmap = tt.getBestCmap() or {}
    finally:
        tt.close()
    strict = path.name.startswith(_TEX_ENCODED_PREFIX)
    chars = set()
    for code, glyph_name in cmap.items():
        ch = chr(code)
        if glyph_name == ".notdef" or not _is_candidate_char(ch):
            continue
        if not strict or agl.toUnicode(glyph_name) == ch:
            chars.add(ch)
    return FontFile(str(path), path.name, family_of(path.name), frozenset(chars)) if chars else None


def _render_centred(font: ImageFont.FreeTypeFont, ch: str, canvas: int) -> np.ndarray | None:
    """(canvas, canvas) uint8 rendering centred by its ink box at the font's size, or None if empty."""
    big = Image.new("L", (canvas * 2, canvas * 2))
    ImageDraw.Draw(big).text((canvas, canvas), ch, font=font, fill=255, anchor="mm")
    box = big.getbbox()
    if box is None:
        return None
    glyph = big.crop(box)
    w, h = glyph.size
    if max(w, h) > canvas:
        s = canvas / max(w, h)
        glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        w, h = glyph.size
    out = Image.new("L", (canvas, canvas))
    out.paste(glyph, ((canvas - w) // 2, (canvas - h) // 2))
    return np.asarray(out)


def _notdef(font: ImageFont.FreeTypeFont, canvas: int) -> np.ndarray | None:
    return _render_centred(font, "\U0010fffd", canvas)  # a private-use code point no font maps


def _signature(img: np.ndarray) -> np.ndarray:
    """(576,) float32 signature: 2x2 box average of a (48, 48) rendering, scaled to [0, 1]."""
    v = img.reshape(24, 2, 24, 2).astype(np.float32).mean(axis=(1, 3)).ravel()
    return v / 255.0


def class_pool(fonts: list[FontFile], min_fonts: int = MIN_FONTS) -> list[GlyphClass]:
    """All candidate classes in code-point order, look-alikes removed.

    A character is kept when (1) at least ``min_fonts`` font files map it to a real glyph,
    (2) it is not a cross-script homoglyph of an earlier candidate by name (``_HOMOGLYPHS``),
    (3) its reference rendering (``_REFERENCE_FONTS``) is visible and not the .notdef box,
    and (4) its 24x24 signature (rendered at a fixed size, centred by the ink box, so ``o``
    and ``O`` differ by size) is at least ``LOOKALIKE_DISTANCE`` away from every already
    kept character's. Per-font checks (empty or .notdef renderings) happen
    when a class is used, see ``storage.glyphs.render``.
    """
    cover: dict[str, list[str]] = {}
    for f in fonts:
        for ch in f.chars:
            cover.setdefault(ch, []).append(f.name)
    chars = sorted((c for c, names in cover.items() if len(names) >= min_fonts), key=ord)
    dropped: set[str] = set()
    present = set(chars)
    for group in _HOMOGLYPHS:
        if group[0] in present:
            dropped.update(group[1:])
    by_name = {f.name: f for f in fonts}
    refs = [n for n in _REFERENCE_FONTS if n in by_name]
    loaded = {n: ImageFont.truetype(by_name[n].path, SIGNATURE_PX) for n in refs}
    notdefs = {n: _notdef(loaded[n], SIGNATURE_CANVAS) for n in refs}
    visible: list[str] = []
    sigs = []
    for ch in chars:
        if ch in dropped:
            continue
        ref = next((n for n in refs if ch in by_name[n].chars), None)
        if ref is None:
            ref_font = ImageFont.truetype(by_name[cover[ch][0]].path, SIGNATURE_PX)
            img, notdef = _render_centred(ref_font, ch, SIGNATURE_CANVAS), _notdef(ref_font, SIGNATURE_CANVAS)
        else:
            img, notdef = _render_centred(loaded[ref], ch, SIGNATURE_CANVAS), notdefs[ref]
        if img is None or (notdef is not None and np.array_equal(img, notdef)):
            continue
        visible.append(ch)
        sigs.append(_signature(img))
    if not visible:
        return []
    S = np.stack(sigs)  # (N, 576)
    sq = (S * S).sum(axis=1)  # (N,)
    total = sq[:, None] + sq[None, :]
    dist = (total - 2.0 * (S @ S.T)) / np.maximum(total, 1e-6)  # (N, N), 0 on the diagonal
    keep = np.zeros(len(visible), dtype=bool)
    for i in range(len(visible)):
        keep[i] = not bool((dist[i, :i][keep[:i]] < LOOKALIKE_DISTANCE).any())
    return [GlyphClass(ch, tuple(sorted(cover[ch]))) for ch, k in zip(visible, keep) if k]


def font_versions(fonts: list[FontFile]) -> dict[str, int]:
    """File sizes of the fonts used, recorded for provenance (fonts change with matplotlib)."""
    return {f.name: os.path.getsize(f.path) for f in fonts}
