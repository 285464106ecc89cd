"""Glyph distractors: characters, rendering as the PNG reader sees it, blocks with resume, the streamed append."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.errors import DataValueError, SchemaError
from storage.features import read_features, write_features
from storage.fewshot import DATASET_SPECS, load_images
from storage.glyphs import fonts as gf
from storage.glyphs.distractors import (
    append_database_rows,
    build_distractor_parts,
    distractor_characters,
    normalise,
    part_path,
    render_block,
)
from storage.glyphs.render import GlyphRenderer

META = {"dataset": "glyphs-retrieval", "backbone": "pixels", "checkpoint_hash": "0" * 8}


@pytest.fixture(scope="module")
def pool():
    fonts = gf.load_fonts()
    return fonts, gf.class_pool(fonts)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """A deterministic stand-in backbone: mean ink of 8 horizontal bands, (B, 8)."""
    return images.reshape(len(images), 8, -1).astype(np.float32).mean(axis=2) / 255.0


def build(parts_dir, n, chars, pool, block_size=4, embed=pixel_features):
    fonts, classes = pool
    return build_distractor_parts(
        parts_dir,
        n,
        embed,
        chars=chars,
        font_paths={f.name: f.path for f in fonts},
        fonts_of={c.char: c.fonts for c in classes},
        seed=0,
        metadata=META,
        block_size=block_size,
    )


def test_characters_exclude_training_classes_and_queries(glyphs_small, pool):
    _, classes = pool
    chars = distractor_characters(
        glyphs_small["fewshot_root"], glyphs_small["retrieval_root"], [c.char for c in classes]
    )
    meta = json.loads((Path(glyphs_small["fewshot_root"]) / "classes.json").read_text())
    train = {c["char"] for c in meta.values() if c["split"] == "train"}
    queries = json.loads((Path(glyphs_small["retrieval_root"]) / "test" / "metadata.json").read_text())["queries"]
    assert train and queries
    assert not (set(chars) & train) and not (set(chars) & {q["char"] for q in queries})
    # the small size uses 100 of the pool's characters: the rest, minus 64 training and 20 query ones
    assert len(chars) == len(classes) - len(train) - len(queries)
    val = {c["char"] for c in meta.values() if c["split"] == "val"}
    assert val <= set(chars)  # validation characters are neither queried nor trained on


def test_normalised_block_equals_the_png_reader(tmp_path, pool):
    fonts, classes = pool
    chars = [c.char for c in classes[:5]]
    images, folders = render_block(
        GlyphRenderer({f.name: f.path for f in fonts}), 0, 6, 0, chars, {c.char: c.fonts for c in classes}
    )
    assert images.shape == (6, 32, 32) and images.dtype == np.uint8 and images.max() > 0
    assert all(f.startswith("U+") for f in folders)
    for i, img in enumerate(images):
        Image.fromarray(img, "L").save(tmp_path / f"{i}.png")
    from_png = load_images(tmp_path, [f"{i}.png" for i in range(6)], DATASET_SPECS["glyphs"])
    np.testing.assert_array_equal(normalise(images, DATASET_SPECS["glyphs"]), from_png)


def test_blocks_are_fixed_by_their_index_and_a_rerun_redoes_only_what_is_missing(tmp_path, pool):
    chars = [c.char for c in pool[1][200:260]]
    parts = build(tmp_path / "a", 10, chars, pool)
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    rows = [read_features(p) for p in parts]
    assert np.concatenate([r.ids for r in rows]).tolist() == list(range(10))  # the last block as far as needed
    assert set(np.concatenate([r.labels for r in rows])) <= {gf.class_folder(c) for c in chars}
    first = np.concatenate([r.embeddings for r in rows])

    # a smaller N gives the same first items (other folder, built from scratch); a larger one completes its blocks
    small = build(tmp_path / "b", 5, chars, pool)
    assert [len(read_features(p)) for p in small] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([read_features(p).embeddings for p in small]), first[:5])
    larger = build(tmp_path / "b", 10, chars, pool)
    np.testing.assert_array_equal(np.concatenate([read_features(p).embeddings for p in larger]), first)

    # resume: a lost part is redrawn identically, the others are not touched
    mtimes = {p: p.stat().st_mtime_ns for p in parts}
    part_path(tmp_path / "a", 1).unlink()
    calls = []
    again = build(tmp_path / "a", 10, chars, pool, embed=lambda x: calls.append(len(x)) or pixel_features(x))
    assert calls == [4]  # block 1 alone
    assert again[0].stat().st_mtime_ns == mtimes[parts[0]] and again[2].stat().st_mtime_ns == mtimes[parts[2]]
    np.testing.assert_array_equal(np.concatenate([read_features(p).embeddings for p in again]), first)

    with pytest.raises(DataValueError, match=r"manifest.json: distractor parts of another configuration.*block_size"):
        build(tmp_path / "a", 10, chars, pool, block_size=8)


def test_append_streams_the_test_table_then_n_distractors(tmp_path, pool):
    rng = np.random.default_rng(0)
    test = write_features(
        tmp_path / "test.parquet",
        ids=np.arange(7),
        labels=["db"] * 4 + ["query"] * 2 + ["U+0041"],
        splits=["database"] * 4 + ["query"] * 2 + ["train"],
        embeddings=rng.normal(size=(7, 8)).astype(np.float32),
        paths=[f"jpg/{i}.png" for i in range(7)],
        metadata=META,
    )
    parts = build(tmp_path / "parts", 8, [c.char for c in pool[1][300:320]], pool, block_size=4)
    out = append_database_rows(test, parts, 6, tmp_path / "with.parquet", batch_size=3)
    before, after = read_features(test), read_features(out)
    db = read_features(out, split="database")
    assert len(after) == 7 + 6 and after.metadata["distractors"] == "6"
    np.testing.assert_array_equal(after.embeddings[:7], before.embeddings)  # the test rows as they were
    assert db.ids.tolist() == [0, 1, 2, 3, *range(7, 13)]  # database rows: the test's first, in order
    distractors = np.concatenate([read_features(p).embeddings for p in parts])[:6]
    np.testing.assert_array_equal(db.embeddings[4:], distractors)
    assert set(db.labels[4:]) == {"distractor"} and db.paths[4:] == [f"distractor/{i}" for i in range(6)]
    assert read_features(out, split="query").ids.tolist() == [4, 5]

    wide = write_features(
        tmp_path / "wide.parquet", ids=[0], labels=["x"], splits="distractor", embeddings=np.ones((1, 9)), metadata=META
    )
    with pytest.raises(SchemaError, match=r"wide.parquet: embedding has dim 9, expected 8"):
        append_database_rows(test, [wide], 1, tmp_path / "bad.parquet")
    with pytest.raises(DataValueError, match=r"part-00001.parquet hold 8 rows, 20 asked"):
        append_database_rows(test, parts, 20, tmp_path / "short.parquet")
    assert not (tmp_path / "short.parquet").exists() and not (tmp_path / "bad.parquet").exists()
