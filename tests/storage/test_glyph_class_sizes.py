"""Glyph test classes are large enough for imbalanced (Dirichlet) query sets (issue 21, item 7).

The figure the sizes rest on is computed with the project's own ``dirichlet_counts`` and
``sample_dirichlet_episodes``; ``benchmarks/bench_glyph_class_sizes.py`` prints the same
figures at more draws. The build test uses a 30-class size made for it (about a second).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssr_tasks.fewshot.episodes import (
    SplitFeatures,
    dirichlet_counts,
    repeated_query_fraction,
    sample_dirichlet_episodes,
)
from storage.glyphs import GENERATOR_VERSION, SIZES, GlyphsSize, dataset, prepare_glyphs

N_WAY, N_QUERY_TOTAL, ALPHA = 5, 75, 2.0


def _images_needed_p99(n_shot: int, draws: int = 20_000) -> int:
    """99th percentile over Dirichlet(2) draws of the images the largest class of an episode needs."""
    rng = np.random.default_rng(0)
    largest = np.array([dirichlet_counts(ALPHA, N_WAY, N_QUERY_TOTAL, rng).max() for _ in range(draws)])
    return int(np.percentile(largest, 99, method="higher")) + n_shot


def _split(n_classes: int, per_class: int) -> SplitFeatures:
    labels = np.repeat(np.arange(n_classes), per_class)
    return SplitFeatures(np.zeros((len(labels), 1), np.float32), labels, [f"c{c}" for c in range(n_classes)], None)


def _episodes_with_repeats(per_class: int, n_shot: int, n_episodes: int = 2000) -> tuple[float, float]:
    """(share of episodes with a repeated query, share of repeated queries) over 200 test classes."""
    eps = sample_dirichlet_episodes(_split(200, per_class), n_episodes, N_WAY, n_shot, N_QUERY_TOTAL, ALPHA, seed=1)
    with_repeat = np.mean([len(np.unique(row)) < len(row) for row in eps.query])
    return float(with_repeat), repeated_query_fraction(eps)


@pytest.mark.parametrize("n_shot", [1, 5])
def test_default_test_classes_need_no_repeat_at_the_99th_percentile(n_shot):
    need = _images_needed_p99(n_shot)
    assert 40 <= need <= 60  # 48 at 1-shot, 52 at 5-shot (benchmarks/bench_glyph_class_sizes.py)
    size = SIZES["default"]
    assert size.test_images_per_class >= need
    episodes_with_repeat, _ = _episodes_with_repeats(size.test_images_per_class, n_shot)
    assert episodes_with_repeat <= 0.01
    # the version-2 class size (20 images) repeated queries in most 5-shot episodes
    old_with_repeat, old_repeated = _episodes_with_repeats(20, n_shot)
    assert old_with_repeat > 0.5 and old_repeated > 0.1


def _micro(test_images: int) -> GlyphsSize:
    return GlyphsSize(
        n_classes=30,  # 19 / 5 / 6 classes
        images_per_class=20,
        test_images_per_class=test_images,
        n_val_episodes=4,
        n_queries=2,
        n_database=20,
        train_per_cluster=1,
        per_query=(1, 1, 1),
    )


def test_test_classes_get_their_own_count_and_keep_the_first_renderings(tmp_path, monkeypatch):
    monkeypatch.setitem(dataset.SIZES, "micro-23", _micro(23))
    monkeypatch.setitem(dataset.SIZES, "micro-20", _micro(20))
    big = prepare_glyphs(tmp_path / "big", size="micro-23", workers=1)
    base = prepare_glyphs(tmp_path / "base", size="micro-20", workers=1)
    fs_big, fs_base = Path(big["fewshot_root"]), Path(base["fewshot_root"])

    counts = {s: {len(list(d.glob("*.png"))) for d in (fs_big / s).iterdir()} for s in ("train", "val", "test")}
    assert counts == {"train": {20}, "val": {20}, "test": {23}}
    assert big["n_classes"] == {"train": 19, "val": 5, "test": 6}
    assert big["n_images"] == 24 * 20 + 6 * 23
    meta = json.loads((fs_big / "dataset.json").read_text())
    assert meta["images_per_class"] == {"train": 20, "val": 20, "test": 23}
    assert meta["generator_version"] == GENERATOR_VERSION == "3"
    # the extra renderings come after the others: the first 20 of a test class are unchanged
    for d in (fs_base / "test").iterdir():
        for png in d.glob("*.png"):
            assert (fs_big / "test" / d.name / png.name).read_bytes() == png.read_bytes()

    # a dataset of another generator version is not reused
    for name in ("glyphs", "glyphs-retrieval"):
        path = tmp_path / "base" / name / "dataset.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "generator_version": "2"}))
    again = prepare_glyphs(tmp_path / "base", size="micro-20", workers=1)
    assert not again["cached"]
    assert prepare_glyphs(tmp_path / "base", size="micro-20", workers=1)["cached"]


def test_image_names_widen_past_100_images():
    assert dataset.image_name("U+0041", 7, 60) == "U+0041_07.png"
    assert dataset.image_name("U+0041", 7, 101) == "U+0041_007.png"
