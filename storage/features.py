"""Parquet features table: one row per image.

Columns: ``id`` int64, ``label`` string or int64, ``split`` string, ``path`` string
(optional column), ``embedding`` fixed_size_list<float32>[D]. File metadata (bytes keys):
``dataset``, ``backbone``, ``checkpoint_hash``, ``dim``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import atomic_path
from storage.errors import CorruptFileError, DataValueError, SchemaError, StorageError
from storage.hashing import file_sha256

REQUIRED_COLUMNS = ("id", "label", "split", "embedding")
OPTIONAL_COLUMNS = ("path",)
REQUIRED_METADATA = ("dataset", "backbone", "checkpoint_hash")
ROW_GROUP_SIZE = 65_536


@dataclass
class FeatureTable:
    """Rows of a features table.

    ids: (N,) int64; labels: (N,) int64 or object array of str; splits: (N,) object array
    of str; paths: list of N str (or None when the file has no path column);
    embeddings: (N, D) float32 row-major; metadata: the file's key/value metadata.
    """

    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: list[str] | None
    embeddings: np.ndarray
    metadata: dict[str, str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


def _label_array(labels: Sequence | np.ndarray, name: str) -> pa.Array:
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        return pa.array(arr.astype(np.int64), type=pa.int64())
    if arr.dtype.kind in "UO" and all(isinstance(v, str) for v in arr.tolist()):
        return pa.array(arr.tolist(), type=pa.string())
    raise DataValueError(f"{name}: label must be all str or all int, got dtype {arr.dtype}")


def _first_nonfinite(ids: np.ndarray, emb: np.ndarray) -> int | None:
    bad = ~np.isfinite(emb).all(axis=1)
    return int(ids[np.argmax(bad)]) if bad.any() else None


def write_features(path: str | os.PathLike, *, ids: Sequence[int] | np.ndarray, labels: Sequence | np.ndarray,
                   splits: str | Sequence[str], embeddings: np.ndarray, paths: Sequence[str] | None = None,
                   metadata: Mapping[str, str]) -> Path:
    """Write a features table atomically.

    ids: (N,) unique ints; labels: (N,) str or int; splits: one str for all rows or (N,)
    str; embeddings: (N, D) finite floats (stored float32); paths: optional (N,) str;
    metadata: must hold ``dataset``, ``backbone``, ``checkpoint_hash`` (``dim`` is added).
    """
    path = Path(path)
    name = path.name
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise SchemaError(f"{name}: embedding must be 2-D (N, D), got shape {emb.shape}")
    n, dim = emb.shape
    ids_arr = np.asarray(ids)
    if ids_arr.shape != (n,) or (n and ids_arr.dtype.kind not in "iu"):
        raise SchemaError(f"{name}: id must be ({n},) integers, got shape {ids_arr.shape} dtype {ids_arr.dtype}")
    ids_arr = ids_arr.astype(np.int64)
    if len(np.unique(ids_arr)) != n:
        uniq, counts = np.unique(ids_arr, return_counts=True)
        raise DataValueError(f"{name}: id {int(uniq[counts > 1][0])} is duplicated; ids must be unique")
    bad = _first_nonfinite(ids_arr, emb)
    if bad is not None:
        raise DataValueError(f"{name}: embedding of id {bad} has NaN or inf values")
    split_list = [splits] * n if isinstance(splits, str) else list(splits)
    label_arr = _label_array(labels, name)
    for col, values in (("label", label_arr), ("split", split_list), ("path", paths)):
        if values is not None and len(values) != n:
            raise SchemaError(f"{name}: {col} has {len(values)} rows, expected {n} (rows of embedding)")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise SchemaError(f"{name}: metadata lacks {missing} (expected keys {list(REQUIRED_METADATA)})")
    meta = {str(k): str(v) for k, v in metadata.items()}
    if meta.get("dim", str(dim)) != str(dim):
        raise SchemaError(f"{name}: embedding has dim {dim}, but metadata dim says {meta['dim']}")
    meta["dim"] = str(dim)
    columns = {"id": pa.array(ids_arr, type=pa.int64()), "label": label_arr,
               "split": pa.array(split_list, type=pa.string())}
    if paths is not None:
        columns["path"] = pa.array(list(paths), type=pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
    table = pa.table(columns).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    return path


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise StorageError(f"{path}: features file not found")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable Parquet file (truncated or wrong format: {exc})") from exc


def _check_schema(path: Path, pf: pq.ParquetFile, expected_dim: int | None) -> tuple[int, dict[str, str], bool]:
    schema = pf.schema_arrow
    names = schema.names
    name = path.name
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise SchemaError(f"{name}: missing column(s) {missing} (expected {list(REQUIRED_COLUMNS)} + optional path)")
    extra = [c for c in names if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        raise SchemaError(f"{name}: unexpected column(s) {extra} (expected {list(REQUIRED_COLUMNS)} + optional path)")
    t = schema.field("id").type
    if t != pa.int64():
        raise SchemaError(f"{name}: id has type {t}, expected int64")
    t = schema.field("label").type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise SchemaError(f"{name}: label has type {t}, expected string or int64")
    t = schema.field("split").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise SchemaError(f"{name}: split has type {t}, expected string")
    t = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise SchemaError(f"{name}: embedding has type {t}, expected fixed_size_list<float32>[D]")
    dim = t.list_size
    raw = schema.metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}
    if "dim" in meta and meta["dim"] != str(dim):
        raise SchemaError(f"{name}: embedding has dim {dim}, but metadata dim says {meta['dim']}")
    if expected_dim is not None and dim != expected_dim:
        raise SchemaError(f"{name}: embedding has dim {dim}, expected {expected_dim}")
    return dim, meta, "path" in names


def _check_ids(path: Path, pf: pq.ParquetFile) -> np.ndarray:
    """The ``id`` column (N,) int64 in row order, checked: no missing value, no duplicate."""
    try:
        ids = pf.read(columns=["id"]).column("id")
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read column id (truncated or corrupt: {exc})") from exc
    if ids.null_count:
        raise DataValueError(f"{path.name}: id has {ids.null_count} missing values")
    arr = ids.to_numpy()
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        raise DataValueError(f"{path.name}: id {int(uniq[counts > 1][0])} is duplicated; ids must be unique")
    return arr.astype(np.int64, copy=False)


def _batch_to_table(path: Path, batch: pa.RecordBatch | pa.Table, dim: int, meta: dict[str, str],
                    has_path: bool, split: str | None) -> FeatureTable:
    name = path.name
    if split is not None:
        mask = pc.equal(batch.column("split"), split)
        batch = batch.filter(mask)
    ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
    for col in ("label", "split", "embedding"):
        c = batch.column(col)
        if c.null_count:
            valid = np.asarray(c.is_valid())
            raise DataValueError(f"{name}: {col} is missing for id {int(ids[np.argmin(valid)])}")
    label_col = batch.column("label")
    if pa.types.is_integer(label_col.type):
        labels = label_col.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        labels = np.asarray(label_col.to_pylist(), dtype=object)
    splits = np.asarray(batch.column("split").to_pylist(), dtype=object)
    paths = batch.column("path").to_pylist() if has_path else None
    emb_col = batch.column("embedding")
    if isinstance(emb_col, pa.ChunkedArray):
        emb_col = emb_col.combine_chunks()
    values = emb_col.flatten().to_numpy(zero_copy_only=False)
    emb = np.ascontiguousarray(values.reshape(len(ids), dim), dtype=np.float32)
    bad = _first_nonfinite(ids, emb)
    if bad is not None:
        raise DataValueError(f"{name}: embedding of id {bad} has NaN or inf values")
    return FeatureTable(ids, labels, splits, paths, emb, dict(meta))


def read_features(path: str | os.PathLike, *, split: str | None = None,
                  expected_dim: int | None = None) -> FeatureTable:
    """Read and validate a whole features table (optionally only rows of ``split``)."""
    path = Path(path)
    pf = _open(path)
    dim, meta, has_path = _check_schema(path, pf, expected_dim)
    _check_ids(path, pf)
    try:
        table = pf.read()
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc
    out = _batch_to_table(path, table, dim, meta, has_path, split)
    if split is not None and len(out) == 0:
        found = sorted(set(table.column("split").to_pylist()))
        raise DataValueError(f"{path.name}: no rows with split '{split}' (found {found})")
    return out


def iter_features(path: str | os.PathLike, batch_size: int = 65_536, split: str | None = None,
                  expected_dim: int | None = None) -> Iterator[FeatureTable]:
    """Stream a features table in batches of at most ``batch_size`` rows (after the
    ``split`` filter batches may be smaller; empty ones are skipped)."""
    path = Path(path)
    pf = _open(path)
    dim, meta, has_path = _check_schema(path, pf, expected_dim)
    _check_ids(path, pf)
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            out = _batch_to_table(path, batch, dim, meta, has_path, split)
            if len(out):
                yield out
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc


def _row_groups_overlapping(pf: pq.ParquetFile, lo: int, hi: int) -> list[int]:
    """Row groups whose ``id`` statistics overlap [lo, hi] (all of them where a row group
    has no statistics)."""
    meta = pf.metadata
    col = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == "id")
    keep = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or (st.max >= lo and st.min <= hi):
            keep.append(g)
    return keep


def lookup_embeddings(path: str | os.PathLike, ids: np.ndarray, *,
                      expected_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the rows with these ids: ``(emb (n, D) float32, found (n,) bool)``, in
    the order of ``ids``; rows not in the table are zero with ``found`` False.

    Reads only the ``id`` and ``embedding`` columns of the row groups whose id statistics
    overlap [min(ids), max(ids)], so a lookup costs about the rows asked for, not the whole
    table, when the table is stored in id order (as tables written from sorted ids are).
    The rows read are checked: no duplicate ids, no NaN or inf.
    """
    path = Path(path)
    pf = _open(path)
    dim, _, _ = _check_schema(path, pf, expected_dim)
    want = np.asarray(ids, dtype=np.int64)
    emb = np.zeros((len(want), dim), np.float32)
    found = np.zeros(len(want), bool)
    if not len(want):
        return emb, found
    order = np.argsort(want, kind="stable")
    sorted_want = want[order]
    seen: set[int] = set()
    groups = _row_groups_overlapping(pf, int(sorted_want[0]), int(sorted_want[-1]))
    try:
        batches = pf.iter_batches(batch_size=65_536, row_groups=groups, columns=["id", "embedding"]) if groups else []
        for batch in batches:
            bids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
            pos = np.minimum(np.searchsorted(sorted_want, bids), len(want) - 1)
            hit = sorted_want[pos] == bids
            if not hit.any():
                continue
            hit_ids = bids[hit]
            if len(np.unique(hit_ids)) != len(hit_ids) or seen.intersection(hit_ids.tolist()):
                dup = next(int(i) for i in hit_ids if int(i) in seen or (hit_ids == i).sum() > 1)
                raise DataValueError(f"{path.name}: id {dup} is duplicated; ids must be unique")
            seen.update(hit_ids.tolist())
            col = batch.column("embedding")
            if col.null_count:
                raise DataValueError(f"{path.name}: embedding is missing for id {int(bids[np.argmin(np.asarray(col.is_valid()))])}")
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(bids), dim)[hit]
            bad = _first_nonfinite(hit_ids, values)
            if bad is not None:
                raise DataValueError(f"{path.name}: embedding of id {bad} has NaN or inf values")
            rows = order[pos[hit]]
            emb[rows] = values
            found[rows] = True
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc
    # ids asked for twice share their row
    if len(np.unique(sorted_want)) != len(sorted_want):
        first = np.searchsorted(sorted_want, sorted_want)
        emb[order] = emb[order][first]
        found[order] = found[order][first]
    return emb, found


def read_ids(path: str | os.PathLike) -> np.ndarray:
    """The ids (N,) int64 of a features table in row order (validates the schema and the
    ids; reads no embeddings)."""
    path = Path(path)
    pf = _open(path)
    _check_schema(path, pf, None)
    return _check_ids(path, pf)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file metadata of a features table (validates the schema, reads no rows)."""
    path = Path(path)
    pf = _open(path)
    return _check_schema(path, pf, None)[1]


def features_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the features file (identifies the exact features a store was built from)."""
    return file_sha256(path)
