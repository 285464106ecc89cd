"""Append distractor features (e.g. revisitop R1M) to a test database's features table, streaming.

Sources (the format is told by the file name):

- ``.npy``: a 2-D float array, read through a memory map one block at a time (each block's
  map is closed after it, so the pages read do not pile up in the process's memory);
- ``.pkl`` / ``.pickle``: a revisitop-style pickle, a dict holding the features under one of
  the keys of ``storage.landmarks.DATABASE_KEYS`` (``X``, ``feats``, ...), as revisitop and
  the landmark pickles store them, (D, N), and optionally ``imlist`` (N image names, used as
  paths). Read with the restricted unpickler; a pickle cannot be memory-mapped, so its array
  is in memory once, and only blocks of it are converted and written;
- ``.parquet``: an ``embedding`` list column (N rows of length D; or D rows of length N,
  read once per output block) or one numeric column per dimension (D columns, N rows) or
  per image (N columns, D rows), streamed by row batches or column groups.

Orientation: (N, D) or (D, N) is told by the test database's D. A square source (N == D)
is ambiguous and refused, and so is a source whose neither side is D; the errors name the
file, its shape and the database's D.

The distractors get the ids max(id) + 1, max(id) + 2, ... of the table (ids 0..N-1 for an
imported revisited test set, so the ground truth keeps its indices), the table's label
placeholder (-1, or ``"distractor"`` for string labels) and its split. The new table is
written as row groups, the original's copied batch by batch and then the distractors
block by block, to a temporary file renamed onto the target when complete: memory is
one block (``block_rows`` x D float32) plus the table's ids. The table's metadata
records each appended source (name, size, rows, first id) under ``distractors``; running
the same import again is a no-op.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import DataValueError, SchemaError, StorageError
from storage.features import READ_BUFFER, FeatureTableWriter, iter_features, read_ids, read_metadata
from storage.landmarks import DATABASE_KEYS
from storage.safe_pickle import safe_load, str_keys

DISTRACTOR_FORMATS = (".npy", ".pkl", ".pickle", ".parquet")
METADATA_KEY = "distractors"


@dataclass(frozen=True)
class DistractorImport:
    """table: the features table written; n_before / n_added: rows before and appended
    (n_added 0 when the source was already imported); first_id: the first distractor id."""

    table: Path
    n_before: int
    n_added: int
    first_id: int
    dim: int


@dataclass(frozen=True)
class _Source:
    """A distractor source seen as an (N, D) matrix: blocks(block_rows) yields its rows in
    order, block_rows at a time (the last block may be shorter)."""

    n: int
    dim: int
    blocks: Callable[[int], Iterator[np.ndarray]]
    paths: list[str] | None


def _orientation(source: str, shape: tuple[int, ...], dim: int) -> bool:
    """True when the source is stored (D, N) (transposed), False for (N, D); refuse the rest."""
    if len(shape) != 2:
        raise SchemaError(f"{source}: distractor features must be 2-D, (N, D) or (D, N); got shape {shape}")
    a, b = shape
    if a == b == dim:
        raise DataValueError(
            f"{source}: shape {shape} is ambiguous, both sides equal the database's D = {dim}; "
            "store it as (N, D) with N != D"
        )
    if b == dim:
        return False
    if a == dim:
        return True
    raise DataValueError(
        f"{source}: shape {shape} has no side equal to the database's D = {dim}; expected (N, {dim}) or ({dim}, N)"
    )


def _check_block(source: str, block: np.ndarray, first_row: int) -> np.ndarray:
    out = np.ascontiguousarray(block, dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataValueError(f"{source}: distractor row {first_row + int(np.argmax(bad))} has NaN or inf values")
    return out


def _npy_source(path: Path, dim: int) -> _Source:
    try:
        head = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: not a readable .npy array ({exc})") from exc
    shape, kind = head.shape, head.dtype.kind
    del head
    if kind not in "fiu":
        raise SchemaError(f"{path}: distractor features must be numeric, got dtype kind {kind!r}")
    transposed = _orientation(str(path), shape, dim)

    n = shape[1] if transposed else shape[0]

    def blocks(block_rows: int) -> Iterator[np.ndarray]:
        for a in range(0, n, block_rows):
            m = np.load(path, mmap_mode="r")  # a fresh map per block: its pages go with it
            block = np.array(m[:, a : a + block_rows].T if transposed else m[a : a + block_rows])
            del m
            yield block

    return _Source(n, dim, blocks, None)


def _pickle_source(path: Path, dim: int) -> _Source:
    obj = safe_load(path)
    if isinstance(obj, np.ndarray):
        arr, paths = obj, None
    elif isinstance(obj, dict):
        obj = str_keys(obj)
        key = next((k for k in DATABASE_KEYS if k in obj), None)
        if key is None:
            raise SchemaError(
                f"{path}: no distractor features; expected one of the keys {list(DATABASE_KEYS)}, "
                f"found {sorted(map(str, obj))}"
            )
        arr = obj[key]
        imlist = obj.get("imlist")
        paths = [str(p) for p in imlist] if imlist is not None else None
    else:
        raise SchemaError(
            f"{path}: expected a dict of features (revisitop style) or an array, got {type(obj).__name__}"
        )
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise SchemaError(f"{path}: distractor features must be numeric, got dtype {arr.dtype}")
    transposed = _orientation(str(path), arr.shape, dim)
    n = arr.shape[1] if transposed else arr.shape[0]
    if paths is not None and len(paths) != n:
        raise SchemaError(f"{path}: imlist has {len(paths)} names, expected {n} (one per distractor)")

    def blocks(block_rows: int) -> Iterator[np.ndarray]:
        for a in range(0, n, block_rows):
            yield arr[:, a : a + block_rows].T if transposed else arr[a : a + block_rows]

    return _Source(n, dim, blocks, paths)


def _parquet_source(path: Path, dim: int) -> _Source:
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{path}: not a readable Parquet file ({exc})") from exc
    schema = pf.schema_arrow
    n_rows = pf.metadata.num_rows
    name = str(path)
    if "embedding" in schema.names:
        t = schema.field("embedding").type
        if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
            width = t.list_size
        elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type) and n_rows:
            width = len(next(pf.iter_batches(batch_size=1, columns=["embedding"])).column(0)[0].values)
        else:
            raise SchemaError(f"{path}: embedding has type {t}, expected a non-empty list of floats")
        transposed = _orientation(name, (n_rows, width), dim)

        def matrix(batch: pa.RecordBatch) -> np.ndarray:
            col = batch.column(0)
            values = col.flatten().to_numpy(zero_copy_only=False)
            if col.null_count or values.size != len(col) * width:
                raise DataValueError(f"{path}: embedding has missing rows or rows not of length {width}")
            return values.reshape(len(col), width)

        def row_batches(block_rows: int) -> Iterator[np.ndarray]:
            for batch in pf.iter_batches(batch_size=block_rows, columns=["embedding"]):
                yield matrix(batch)

        if not transposed:
            return _Source(n_rows, dim, row_batches, None)

        # D rows of length N: each output block reads the D rows once and keeps its columns
        def column_blocks(block_rows: int) -> Iterator[np.ndarray]:
            for a in range(0, width, block_rows):
                parts = [m[:, a : a + block_rows] for m in row_batches(16)]
                yield np.concatenate(parts, axis=0).T

        return _Source(width, dim, column_blocks, None)
    names = schema.names
    bad = [
        c
        for c in names
        if not (pa.types.is_floating(schema.field(c).type) or pa.types.is_integer(schema.field(c).type))
    ]
    if bad or not names:
        raise SchemaError(
            f"{path}: expected an 'embedding' list column or only numeric columns (one per dimension or "
            f"one per image), found non-numeric column(s) {bad}"
        )
    transposed = _orientation(name, (n_rows, len(names)), dim)

    def wide_rows(block_rows: int) -> Iterator[np.ndarray]:
        for batch in pf.iter_batches(batch_size=block_rows):
            yield np.stack([c.to_numpy(zero_copy_only=False) for c in batch.columns], axis=1)

    def wide_columns(block_rows: int) -> Iterator[np.ndarray]:
        for a in range(0, len(names), block_rows):
            t = pf.read(columns=names[a : a + block_rows])  # D rows x (images of this block)
            yield np.stack([c.to_numpy() for c in t.columns], axis=0)

    if transposed:
        return _Source(len(names), dim, wide_columns, list(names))
    return _Source(n_rows, dim, wide_rows, None)


def open_distractors(path: str | os.PathLike, dim: int) -> _Source:
    """The distractor file at ``path`` as an (N, D) block source, D = ``dim`` (the test database's)."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: distractor file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy_source(path, dim)
    if suffix in (".pkl", ".pickle"):
        return _pickle_source(path, dim)
    if suffix == ".parquet":
        return _parquet_source(path, dim)
    raise StorageError(f"{path}: unknown distractor format {suffix!r}; expected one of {list(DISTRACTOR_FORMATS)}")


def _source_key(path: Path) -> dict:
    st = path.stat()
    return {"source": path.name, "size": st.st_size}


def _recorded(meta: dict[str, str]) -> list[dict]:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return entries if isinstance(entries, list) else []


def import_distractors(
    table: str | os.PathLike,
    source: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    block_rows: int = 65_536,
) -> DistractorImport:
    """Append the distractor features of ``source`` to the features table ``table``.

    Writes ``out`` (default: ``table`` itself, replaced atomically). Distractor ids continue
    after the table's largest id. A source already recorded in the table's metadata (same
    name and size) is not appended again (``n_added`` 0). Memory: one block of
    ``block_rows`` rows (and, for a pickle, the unpickled array).
    """
    table, source = Path(table), Path(source)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    meta = read_metadata(table)
    dim = int(meta["dim"])
    ids = read_ids(table)
    target = Path(out) if out is not None else table
    key = _source_key(source)
    written = meta if target.resolve() == table.resolve() else (read_metadata(target) if target.exists() else {})
    done = [e for e in _recorded(written) if e.get("source") == key["source"] and e.get("size") == key["size"]]
    if done:  # this source is already in the target: nothing to do
        e = done[0]
        return DistractorImport(target, int(e["first_id"]), 0, int(e["first_id"]), dim)
    src = open_distractors(source, dim)
    if src.n < 1:
        raise DataValueError(f"{source}: no distractor rows")
    first_id = int(ids.max()) + 1 if len(ids) else 0
    pf = pq.ParquetFile(table)
    label_type = pf.schema_arrow.field("label").type
    has_path = "path" in pf.schema_arrow.names
    splits = sorted(set(pf.read(columns=["split"]).column("split").unique().to_pylist()))
    split = splits[0] if len(splits) == 1 else "database"
    label_type = pa.int64() if pa.types.is_integer(label_type) else pa.string()
    placeholder = -1 if pa.types.is_int64(label_type) else "distractor"
    new_meta = dict(meta)
    new_meta[METADATA_KEY] = json.dumps([*_recorded(meta), {**key, "rows": src.n, "first_id": first_id}])
    with FeatureTableWriter(
        target, dim=dim, label_type=label_type, metadata=new_meta, has_path=has_path, row_group_size=block_rows
    ) as w:
        for part in iter_features(table, batch_size=block_rows):
            w.write(
                ids=part.ids,
                labels=pa.array(part.labels.tolist(), label_type),
                splits=pa.array(part.splits.tolist(), pa.string()),
                embeddings=part.embeddings,
                paths=part.paths,
            )
        a = 0
        for raw in src.blocks(block_rows):
            block = _check_block(str(source), raw, a)
            b = a + len(block)
            if block.shape[1] != dim or b > src.n:
                raise DataValueError(
                    f"{source}: rows {a}..{b} have shape {block.shape}, expected at most {src.n} rows of {dim}"
                )
            paths = None
            if has_path:
                paths = src.paths[a:b] if src.paths is not None else [f"distractor/{i}" for i in range(a, b)]
            w.write(
                ids=np.arange(first_id + a, first_id + b, dtype=np.int64),
                labels=pa.array([placeholder] * (b - a), label_type),
                splits=split,
                embeddings=block,
                paths=paths,
            )
            a = b
            pa.default_memory_pool().release_unused()  # mimalloc keeps freed blocks otherwise
        if a != src.n:
            raise DataValueError(f"{source}: {a} distractor rows read, expected {src.n}")
    return DistractorImport(target, len(ids), src.n, first_id, dim)


def iter_distractor_blocks(path: str | os.PathLike, dim: int, block_rows: int = 65_536) -> Iterator[np.ndarray]:
    """The distractors of ``path`` as consecutive (n, D) float32 blocks (checked: finite)."""
    a = 0
    for raw in open_distractors(path, dim).blocks(block_rows):
        yield _check_block(str(path), raw, a)
        a += len(raw)
