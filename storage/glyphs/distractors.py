"""Distractors for the built-in retrieval set: N extra database images, a glyph "R1M".

The distractors are renderings of the characters that are neither queried nor trained on:
the matplotlib pool's characters that the dataset left out, its validation characters and
its test characters without a query (``distractor_characters``). Each is drawn as the
dataset's own distractor design (``retrieval.sample_item("distractor")``: a random font
of the character, the mild augmentation). Item ``i`` belongs to block ``i // block_size``,
and a block's renderings come from ``default_rng([seed, 0xD15, block])`` alone, so any N
gives the first N items of one fixed sequence and a rerun redraws exactly what it lost.

Nothing holds all N: :func:`build_distractor_parts` renders one block at a time, hands it
to ``embed`` (the backbone, supplied by the caller: storage imports no model) and writes
the block's features as one Parquet part file (atomic); a rerun skips the parts on disk.
:func:`append_database_rows` then streams a test features table and the first N rows of
the parts (or of any features table, e.g. an imported R1M) into a new table, the extra
rows as split ``database`` after the test database: the ground truth keeps its indices and
every distractor is a negative.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_path
from storage.errors import DataValueError, SchemaError
from storage.features import FeatureTableWriter, iter_features, read_metadata, write_features
from storage.fewshot import DatasetSpec
from storage.glyphs import fonts as gf
from storage.glyphs import retrieval as gr
from storage.glyphs.render import IMAGE_SIZE, GlyphRenderer

BLOCK_SIZE = 4096
DISTRACTOR_SPLIT = "database"
DISTRACTOR_LABEL = "distractor"
_MANIFEST = "manifest.json"
_BLOCK_STREAM = 0xD15  # the rng stream of the distractor blocks (the dataset's use 0, 1, 2)
_CLEAR_EVERY = 4  # blocks between clearings of the renderer's cache of base renderings (4 KiB each)


def distractor_characters(fewshot_root: str | Path, retrieval_root: str | Path, pool: Sequence[str]) -> list[str]:
    """The characters of ``pool`` (the matplotlib pool, ``fonts.class_pool``) that are neither
    a training class (``classes.json`` split ``train``: the retrieval training clusters and
    the backbone's base classes) nor a query character (``test/metadata.json``), in code
    point order."""
    classes_path = Path(fewshot_root) / "classes.json"
    meta_path = Path(retrieval_root) / "test" / "metadata.json"
    try:
        classes = json.loads(classes_path.read_text(encoding="utf-8"))
        queries = json.loads(meta_path.read_text(encoding="utf-8"))["queries"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataValueError(f"{classes_path} / {meta_path}: cannot read the classes and queries ({exc})") from None
    excluded = {c["char"] for c in classes.values() if c["split"] == "train"} | {q["char"] for q in queries}
    return sorted((c for c in set(pool) if c not in excluded), key=ord)


def plan_block(
    block: int, block_size: int, seed: int, chars: Sequence[str], fonts_of: dict[str, Sequence[str]]
) -> list[tuple[str, list[str], np.random.Generator]]:
    """The draws of one block: per item its character and its fonts in a random order (the
    first that draws the character is used), and the generator its augmentation comes from.
    All from ``default_rng([seed, 0xD15, block])``."""
    rng = np.random.default_rng([seed, _BLOCK_STREAM, block])
    picks = rng.integers(len(chars), size=block_size)
    out = []
    for p in picks:
        ch = chars[int(p)]
        fonts = list(fonts_of[ch])
        out.append((ch, [fonts[i] for i in rng.permutation(len(fonts))], rng))
    return out


def render_block(
    renderer: GlyphRenderer,
    block: int,
    block_size: int,
    seed: int,
    chars: Sequence[str],
    fonts_of: dict[str, Sequence[str]],
    count: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(count, 32, 32) uint8 images of the first ``count`` items (default: all ``block_size``)
    of block ``block``, and their class folders (``U+XXXX``). The first items of a block are
    the same whatever ``count``: the block's draws are planned whole, then rendered in order."""
    plan = plan_block(block, block_size, seed, chars, fonts_of)[: block_size if count is None else count]
    images = np.zeros((len(plan), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    folders = []
    for i, (ch, fonts, rng) in enumerate(plan):
        drawn = [f for f in fonts if renderer.base(f, ch) is not None][:1]
        if not drawn:
            raise ValueError(f"U+{ord(ch):04X}: none of {len(fonts)} font files draws a glyph")
        font, aug = gr.sample_item("distractor", None, drawn, gf.family_of, rng)
        img, _ = renderer.render(font, ch, aug)
        images[i] = np.asarray(img, np.uint8)
        folders.append(gf.class_folder(ch))
    return images, folders


def normalise(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """(B, 32, 32) uint8 grey images -> (B, 1, 32, 32) float32 as ``storage.fewshot.load_images``
    gives them from the PNG files (``spec``: the glyphs' spec, one channel, no resize)."""
    if spec.channels != 1 or spec.resize is not None or spec.center_crop is not None or spec.image_size != IMAGE_SIZE:
        raise ValueError(f"distractors: spec {spec.name!r} is not the glyphs' (one channel, {IMAGE_SIZE} px, as is)")
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - np.float32(spec.mean[0])) / np.float32(spec.std[0])).astype(np.float32)


def _check_manifest(parts_dir: Path, identity: dict) -> None:
    path = parts_dir / _MANIFEST
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != identity:
            diff = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            raise DataValueError(
                f"{path}: distractor parts of another configuration (differs in {diff}); "
                "use another folder or delete this one"
            )
        return
    parts_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def part_path(parts_dir: Path, block: int) -> Path:
    return Path(parts_dir) / f"part-{block:05d}.parquet"


def build_distractor_parts(
    parts_dir: str | Path,
    n: int,
    embed: Callable[[np.ndarray], np.ndarray],
    *,
    chars: Sequence[str],
    font_paths: dict[str, str],
    fonts_of: dict[str, Sequence[str]],
    seed: int,
    metadata: dict[str, str],
    block_size: int = BLOCK_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Render and embed the first ``n`` distractors, block by block, into part files.

    parts_dir: one folder per (seed, characters, backbone): ``metadata`` (the features'
    ``dataset``, ``backbone``, ``checkpoint_hash``), ``seed``, ``block_size`` and ``chars``
    are its manifest, and a folder of another configuration is refused. embed: (B, 32, 32)
    uint8 images -> (B, D) float32 features. chars: the distractor characters
    (:func:`distractor_characters`); fonts_of: character -> font file names that may draw
    it; font_paths: font file name -> path. Memory: one block of images and features.

    Returns the part files of blocks 0 .. ceil(n / block_size) - 1. Part ``b`` holds the
    block's first items (all of them, or as many as n needs of the last block; a part too
    short for a larger n is rendered again), ids ``b * block_size + i`` (the distractor's
    number), label = class folder, split ``distractor``.
    """
    if n < 0 or block_size < 1:
        raise ValueError(f"distractors: n must be >= 0 and block_size >= 1, got n={n}, block_size={block_size}")
    if n and not chars:
        raise ValueError("distractors: no character is left for distractors (every one is queried or trained on)")
    parts_dir = Path(parts_dir)
    identity = {
        "seed": int(seed),
        "block_size": int(block_size),
        "chars": "".join(chars),
        **{k: str(metadata[k]) for k in ("dataset", "backbone", "checkpoint_hash")},
    }
    _check_manifest(parts_dir, identity)
    n_blocks = -(-n // block_size)
    renderer = GlyphRenderer(font_paths)
    parts = []
    for b in range(n_blocks):
        path = part_path(parts_dir, b)
        need = min(block_size, n - b * block_size)
        if not path.is_file() or pq.ParquetFile(path).metadata.num_rows < need:
            if b % _CLEAR_EVERY == 0:  # at most _CLEAR_EVERY * block_size base renderings cached
                renderer.clear()
            images, folders = render_block(renderer, b, block_size, seed, chars, fonts_of, count=need)
            emb = np.asarray(embed(images), np.float32)
            write_features(
                path,
                ids=np.arange(b * block_size, b * block_size + need, dtype=np.int64),
                labels=folders,
                splits="distractor",
                embeddings=emb,
                metadata={**metadata, "role": "glyph distractors"},
            )
        parts.append(path)
        if progress is not None:
            progress(b + 1, n_blocks)
    return parts


def _rows(tables: Sequence[Path], n: int, dim: int, batch_size: int) -> Iterator[np.ndarray]:
    """The embeddings of the first n rows of ``tables`` (in order), in batches."""
    left = n
    for t in tables:
        for batch in iter_features(t, batch_size=batch_size, expected_dim=dim, accept_lists=True):
            if left <= 0:
                return
            emb = batch.embeddings[:left]
            left -= len(emb)
            yield emb
    if left > 0:
        raise DataValueError(f"distractors: {', '.join(map(str, tables))} hold {n - left} rows, {n} asked")


def append_database_rows(
    test_table: str | Path,
    extra: Sequence[str | Path],
    n: int,
    out: str | Path,
    *,
    batch_size: int = 65_536,
    label: str = DISTRACTOR_LABEL,
) -> Path:
    """A copy of ``test_table`` with the first ``n`` rows of the ``extra`` tables appended as
    database items, streamed (memory: one batch), written atomically.

    The appended rows get split ``database``, label ``label`` (-1 where labels are ints) and ids after
    the largest id of ``test_table``, in order; the ``path`` column (when the test table has
    one) is ``distractor/<n>``. Reading the result's split ``database`` in file order gives
    the test database first (row i is still ground-truth index i), then the distractors.
    Their width must be the test table's (``x.parquet: embedding has dim 128, expected 256``).
    """
    test_table, out = Path(test_table), Path(out)
    meta = read_metadata(test_table)
    dim = int(meta["dim"])
    extra_paths = [Path(p) for p in extra]
    for p in extra_paths:
        found = int(read_metadata(p, accept_lists=True).get("dim", "0") or 0)
        if found and found != dim:
            raise SchemaError(f"{p}: embedding has dim {found}, expected {dim} (the test table {test_table.name})")
    first = next(iter_features(test_table, batch_size=1))
    int_labels = first.labels.dtype.kind in "iu"
    has_path = first.paths is not None
    max_id = -1
    with FeatureTableWriter(
        out,
        dim=dim,
        label_type=pa.int64() if int_labels else pa.string(),
        metadata={**meta, "distractors": str(n)},
        has_path=has_path,
    ) as w:
        for batch in iter_features(test_table, batch_size=batch_size):
            w.write(
                ids=batch.ids, labels=batch.labels, splits=batch.splits, embeddings=batch.embeddings, paths=batch.paths
            )
            max_id = max(max_id, int(batch.ids.max()))
        done = 0
        for emb in _rows(extra_paths, n, dim, batch_size):
            m = len(emb)
            numbers = np.arange(done, done + m)
            w.write(
                ids=max_id + 1 + numbers,
                labels=np.full(m, -1, np.int64) if int_labels else [label] * m,
                splits=DISTRACTOR_SPLIT,
                embeddings=emb,
                paths=[f"distractor/{i}" for i in numbers] if has_path else None,
            )
            done += m
    return out
