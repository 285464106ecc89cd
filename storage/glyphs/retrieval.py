"""The retrieval variant of the glyph dataset: renderings for database items and queries,
the ground-truth rule and the revisited-Oxford ground-truth pickle.

Ground-truth rule (``label_for``), for a query rendered from font ``fq`` and a database
image of character ``c`` rendered from font ``f`` with augmentation ``a``:

- ``c`` differs from the query's character: negative (not listed);
- ``junk`` when the image is heavily degraded: the occlusion removed at least 40 % of its
  ink, or ``|rotation| >= 45`` degrees;
- ``easy`` when ``f`` is of the same family as ``fq`` (DejaVu Sans, DejaVu Sans Mono,
  DejaVu Serif, STIX, Computer Modern roman, ...), the transform stays inside the mild
  range (``transform_magnitude(a) <= 1``: rotation <= 10 deg, scale in [0.9, 1.1],
  shear <= 0.15, shift <= 2 px) and less than 10 % of the ink was occluded;
- ``hard`` otherwise: another family, or a larger transform, or a light occlusion.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from storage.glyphs.render import IMAGE_SIZE, Aug, sample_mild_aug, transform_magnitude

JUNK_REMOVED = 0.4
JUNK_ROTATION_DEG = 45.0
EASY_REMOVED = 0.1
_HARD_OTHER_FAMILY = 0.6  # share of "hard" designs drawn from another font family
_SIDES = ("left", "right", "top", "bottom")


def label_for(query: dict, item: dict, family_of) -> str | None:
    """``"easy"``, ``"hard"``, ``"junk"`` or None (negative) for a database item.

    query, item: metadata dicts with ``char``, ``font``, ``aug`` (``Aug.to_json()``) and,
    for the item, ``removed`` (fraction of ink occluded). family_of: font name -> family.
    """
    if item["char"] != query["char"]:
        return None
    aug = Aug(**{k: (tuple(v) if k == "occlusion" and v is not None else v) for k, v in item["aug"].items()})  # type: ignore[arg-type]  # the fields of Aug.to_json
    if item["removed"] >= JUNK_REMOVED or abs(aug.rotation_deg) >= JUNK_ROTATION_DEG:
        return "junk"
    if (
        family_of(item["font"]) == family_of(query["font"])
        and transform_magnitude(aug) <= 1.0 + 1e-6
        and item["removed"] < EASY_REMOVED
    ):
        return "easy"
    return "hard"


def _strong_aug(rng: np.random.Generator) -> Aug:
    sign = lambda: float(rng.choice((-1.0, 1.0)))  # noqa: E731
    scale = float(rng.uniform(0.72, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.15, 1.25))
    return Aug(
        rotation_deg=sign() * float(rng.uniform(15, 30)),
        scale=scale,
        shear=sign() * float(rng.uniform(0.2, 0.35)),
        dx=float(rng.uniform(-3, 3)),
        dy=float(rng.uniform(-3, 3)),
        stroke=int(rng.integers(-1, 2)),
    )


def sample_item(
    design: str, query_font: str | None, fonts: list[str], family_of, rng: np.random.Generator
) -> tuple[str, Aug]:
    """Font and augmentation of one database image of a given design.

    design: ``"easy"`` (font of the query's family, mild augmentation), ``"hard"``
    (another family with mild augmentation, or the same family with a strong one),
    ``"junk"`` (occlusion of 50-70 % of the ink box, or rotation of 60-180 deg) or
    ``"distractor"`` (a character that is not queried). fonts: the fonts that draw the
    character. The label actually stored comes from ``label_for``, not from the design.
    """
    if design == "distractor" or query_font is None:
        return str(rng.choice(fonts)), sample_mild_aug(rng)
    fam = family_of(query_font)
    same = [f for f in fonts if family_of(f) == fam]
    other = [f for f in fonts if family_of(f) != fam]
    if design == "easy":
        return str(rng.choice(same)), sample_mild_aug(rng)
    if design == "hard":
        if other and rng.random() < _HARD_OTHER_FAMILY:
            return str(rng.choice(other)), sample_mild_aug(rng)
        return str(rng.choice(same)), _strong_aug(rng)
    if design == "junk":
        base = sample_mild_aug(rng)
        if rng.random() < 0.5:
            occlusion = (str(rng.choice(_SIDES)), float(rng.uniform(0.5, 0.7)))
            return str(rng.choice(fonts)), replace(base, occlusion=occlusion)
        rot = float(rng.choice((-1.0, 1.0))) * float(rng.uniform(60, 180))
        return str(rng.choice(fonts)), replace(base, rotation_deg=rot)
    raise ValueError(f"design must be easy/hard/junk/distractor, got {design!r}")


def query_bbx(bbox: list[int], pad: int = 2) -> list[float]:
    """Query crop box ``[x0, y0, x1, y1]``: the ink box grown by ``pad`` px, inside the image."""
    x0, y0, x1, y1 = bbox
    if x1 <= x0 or y1 <= y0:
        return [0.0, 0.0, float(IMAGE_SIZE), float(IMAGE_SIZE)]
    return [
        float(max(0, x0 - pad)),
        float(max(0, y0 - pad)),
        float(min(IMAGE_SIZE, x1 + pad)),
        float(min(IMAGE_SIZE, y1 + pad)),
    ]


def build_gnd(queries: list[dict], database: list[dict], family_of) -> list[dict]:
    """Per query ``{"easy", "hard", "junk": [int], "bbx": [4 floats]}`` over ``database`` order."""
    by_char: dict[str, list[int]] = {}
    for i, item in enumerate(database):
        by_char.setdefault(item["char"], []).append(i)
    gnd = []
    for q in queries:
        entry: dict = {"easy": [], "hard": [], "junk": []}
        for i in by_char.get(q["char"], []):
            label = label_for(q, database[i], family_of)
            if label is not None:
                entry[label].append(int(i))
        entry["bbx"] = query_bbx(q["bbox"])
        gnd.append(entry)
    return gnd


def write_gnd_pickle(path: Path, imlist: list[str], qimlist: list[str], gnd: list[dict]) -> None:
    """The revisited-Oxford ground truth: plain dict/list/str/int/float, pickle protocol 4."""
    data = {
        "imlist": [str(x) for x in imlist],
        "qimlist": [str(x) for x in qimlist],
        "gnd": [
            {
                "easy": [int(i) for i in g["easy"]],
                "hard": [int(i) for i in g["hard"]],
                "junk": [int(i) for i in g["junk"]],
                "bbx": [float(v) for v in g["bbx"]],
            }
            for g in gnd
        ],
    }
    path.write_bytes(pickle.dumps(data, protocol=4))


def design_counts(n_queries: int, n_database: int, per_query: tuple[int, int, int]) -> tuple[int, int]:
    """(items per query class, distractor items) for ``n_database`` items in total."""
    n_pos = sum(per_query)
    n_distractors = n_database - n_queries * n_pos
    if n_distractors < 0:
        raise ValueError(f"n_database={n_database} is smaller than {n_queries} queries x {n_pos} positives")
    return n_pos, n_distractors


def spread(total: int, n_bins: int) -> list[int]:
    """``total`` split into ``n_bins`` near-equal integer counts, larger ones first."""
    base, extra = divmod(total, n_bins)
    return [base + (1 if i < extra else 0) for i in range(n_bins)]
