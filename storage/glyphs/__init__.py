"""The built-in dataset: characters rendered from matplotlib's bundled fonts (docs/glyphs.md).

``dataset`` plans, renders and writes it (``prepare_glyphs``), ``fonts`` finds the fonts and
the character classes, ``render`` draws and augments one sample, ``retrieval`` holds the
retrieval variant's database designs and ground-truth rule.
"""

from storage.glyphs.dataset import (
    FEWSHOT_DIR,
    GENERATOR_VERSION,
    GND_NAME,
    N_QUERY,
    N_WAY,
    RETRIEVAL_DIR,
    SIZES,
    SPLIT_FRACTIONS,
    ClassTask,
    GlyphsSize,
    prepare_glyphs,
)

__all__ = [
    "FEWSHOT_DIR",
    "GENERATOR_VERSION",
    "GND_NAME",
    "N_QUERY",
    "N_WAY",
    "RETRIEVAL_DIR",
    "SIZES",
    "SPLIT_FRACTIONS",
    "ClassTask",
    "GlyphsSize",
    "prepare_glyphs",
]
