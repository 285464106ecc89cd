"""Parquet features table: one row per image.

Columns: ``id`` int64, ``label`` string or int64, ``split`` string, ``path`` string
(optional column), ``embedding`` fixed_size_list<float32>[D]. File metadata (bytes keys):
``dataset``, ``backbone``, ``checkpoint_hash``, ``dim``.

The readers also take, with ``accept_lists=True``, an ``embedding`` column as pandas,
polars or pyarrow write it from rows of numpy arrays: list<float32|float64> or
large_list<...>. D is then the metadata's ``dim`` or else the length of the first row, and
every row must have that length (``x.parquet: embedding: row id 17 has length 3, expected
4``). Values always come back as float32 (N, D). Without the flag such a table is refused,
as before: the project's own tables are fixed-size. ``FeatureTableWriter`` writes a table
batch by batch (the importers of users' tables, ``storage.own_data``, stream through it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
# Files are opened without pre-buffering and read through a buffered stream of this many
# bytes: with pre-buffering, streaming a file (iter_batches) keeps the raw bytes of every
# row group read so far until the reader is done, and without a buffer each column chunk
# is read whole; so streaming holds about one decoded batch, not the file (with the
# batches of LOOKUP_BATCH_BYTES, at 200k x 768 the peaks went from 0.8 to 0.5 GiB for an
# import and from 2.1 to 0.5 GiB for a search; docs/benchmarks.md).
READ_BUFFER = 4 << 20
LOOKUP_BATCH_BYTES = 32 << 20  # embeddings per batch that lookup_embeddings scans


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


def write_features(
    path: str | os.PathLike,
    *,
    ids: Sequence[int] | np.ndarray,
    labels: Sequence | np.ndarray,
    splits: str | Sequence[str] | np.ndarray,
    embeddings: np.ndarray,
    paths: Sequence[str] | None = None,
    metadata: Mapping[str, str],
) -> Path:
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
    columns = {
        "id": pa.array(ids_arr, type=pa.int64()),
        "label": label_arr,
        "split": pa.array(split_list, type=pa.string()),
    }
    if paths is not None:
        columns["path"] = pa.array(list(paths), type=pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
    table = pa.table(columns).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    return path


class FeatureTableWriter:
    """Write a features table batch by batch, atomically (temp file + rename on a clean
    ``close``; removed when the ``with`` block raises).

    The file is the same as :func:`write_features` writes: ``id`` int64, ``label``
    (``label_type``: int64 or string), ``split``, ``path`` (when ``has_path``) and
    ``embedding`` fixed_size_list<float32>[dim], with ``metadata`` (``dataset``,
    ``backbone``, ``checkpoint_hash``; ``dim`` is added). Each batch is checked as in
    write_features (finite values, ids unique across all batches, lengths agree).
    Memory: one batch plus the ids written so far (8 bytes a row).

        with FeatureTableWriter(path, dim=768, label_type=pa.string(), metadata=meta) as w:
            for ids, labels, splits, emb in batches:
                w.write(ids=ids, labels=labels, splits=splits, embeddings=emb)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dim: int,
        label_type: pa.DataType,
        metadata: Mapping[str, str],
        has_path: bool = False,
        row_group_size: int = ROW_GROUP_SIZE,
    ):
        self.path = Path(path)
        name = self.path.name
        if dim < 1:
            raise SchemaError(f"{name}: embedding dim must be >= 1, got {dim}")
        if not (pa.types.is_int64(label_type) or pa.types.is_string(label_type)):
            raise SchemaError(f"{name}: label type must be int64 or string, got {label_type}")
        missing = [k for k in REQUIRED_METADATA if k not in metadata]
        if missing:
            raise SchemaError(f"{name}: metadata lacks {missing} (expected keys {list(REQUIRED_METADATA)})")
        meta = {str(k): str(v) for k, v in metadata.items()}
        if meta.get("dim", str(dim)) != str(dim):
            raise SchemaError(f"{name}: embedding has dim {dim}, but metadata dim says {meta['dim']}")
        meta["dim"] = str(dim)
        fields = [pa.field("id", pa.int64()), pa.field("label", label_type), pa.field("split", pa.string())]
        if has_path:
            fields.append(pa.field("path", pa.string()))
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
        self.schema = pa.schema(fields, metadata={k.encode(): v.encode() for k, v in meta.items()})
        self.dim, self.has_path, self.row_group_size = dim, has_path, row_group_size
        self.n_rows = 0
        self._ids: list[np.ndarray] = []
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(tmp, self.schema)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())  # removes the temp file
            raise

    def write(
        self,
        *,
        ids: np.ndarray,
        labels: Sequence | np.ndarray | pa.Array,
        splits: str | Sequence[str] | pa.Array,
        embeddings: np.ndarray,
        paths: Sequence[str] | pa.Array | None = None,
    ) -> None:
        """Append rows. ids: (n,) ints; labels: (n,) of the label type; splits: one str or
        (n,); embeddings: (n, dim) finite floats; paths: (n,) str, exactly when has_path."""
        if self._writer is None:
            raise StorageError(f"{self.path.name}: writer is closed")
        name = self.path.name
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise SchemaError(f"{name}: embedding batch has shape {emb.shape}, expected (n, {self.dim})")
        n = emb.shape[0]
        ids_arr = np.asarray(ids)
        if ids_arr.shape != (n,) or (n and ids_arr.dtype.kind not in "iu"):
            raise SchemaError(f"{name}: id must be ({n},) integers, got shape {ids_arr.shape} dtype {ids_arr.dtype}")
        ids_arr = ids_arr.astype(np.int64)
        bad = _first_nonfinite(ids_arr, emb)
        if bad is not None:
            raise DataValueError(f"{name}: embedding of id {bad} has NaN or inf values")
        label_col = labels if isinstance(labels, pa.Array) else pa.array(np.asarray(labels).tolist(), type=None)
        try:
            label_col = label_col.cast(self.schema.field("label").type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(
                f"{name}: label has type {label_col.type}, expected {self.schema.field('label').type}"
            ) from exc
        split_col = pa.array([splits] * n, pa.string()) if isinstance(splits, str) else pa.array(splits, pa.string())
        cols = {"id": pa.array(ids_arr, pa.int64()), "label": label_col, "split": split_col}
        if (paths is not None) != self.has_path:
            raise SchemaError(f"{name}: path column {'expected' if self.has_path else 'not expected'} in this batch")
        if paths is not None:
            cols["path"] = (
                paths.cast(pa.string()) if isinstance(paths, pa.Array) else pa.array(list(paths), pa.string())
            )
        for col, values in cols.items():
            if len(values) != n:
                raise SchemaError(f"{name}: {col} has {len(values)} rows, expected {n} (rows of embedding)")
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), self.dim)
        self._writer.write_table(pa.table(cols, schema=self.schema), row_group_size=self.row_group_size)
        self._ids.append(ids_arr)
        self.n_rows += n

    def close(self) -> Path:
        """Check ids are unique over all batches, finish the file and rename it into place."""
        if self._writer is None:
            return self.path
        writer, self._writer = self._writer, None
        try:
            writer.close()
            all_ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            uniq, counts = np.unique(all_ids, return_counts=True)
            if len(uniq) != len(all_ids):
                raise DataValueError(
                    f"{self.path.name}: id {int(uniq[counts > 1][0])} is duplicated; ids must be unique"
                )
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.close()
        return self.path

    def abort(self) -> None:
        """Drop the partial file (the target is left as it was)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            err = StorageError(f"{self.path.name}: write aborted")
            self._stack.__exit__(StorageError, err, None)  # atomic_path removes the temp file

    def __enter__(self) -> FeatureTableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise StorageError(f"{path}: features file not found")
    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable Parquet file (truncated or wrong format: {exc})") from exc


def is_list_type(t: pa.DataType) -> bool:
    """True for list<float*> / large_list<float*> (variable length: D is checked per row)."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)


def embedding_type_dim(t: pa.DataType, source: str, accept_lists: bool = True) -> int | None:
    """D of an ``embedding`` column type: the size of a fixed_size_list<float*>, None for a
    list<float*> / large_list<float*> (D comes from the rows) when ``accept_lists``; any
    other type is a SchemaError naming ``source``."""
    if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
        return t.list_size
    if accept_lists and is_list_type(t):
        return None
    if accept_lists:
        raise SchemaError(
            f"{source}: embedding has type {t}, expected list<float32|float64>, large_list<...> "
            "or fixed_size_list<float32|float64>[D]"
        )
    hint = (
        (
            " (a list<float> column as pandas writes it is read with accept_lists=True, or imported with "
            "storage.own_data.import_fewshot_table)"
        )
        if is_list_type(t)
        else ""
    )
    raise SchemaError(f"{source}: embedding has type {t}, expected fixed_size_list<float32>[D]{hint}")


def embedding_array(column: pa.Array | pa.ChunkedArray, ids: np.ndarray, dim: int, source: str) -> np.ndarray:
    """The rows of an ``embedding`` column as (n, D) float32 (a copy), checked: no missing
    row, and for list columns every row of length ``dim``.

    column: n rows of fixed_size_list / list / large_list of floats; ids: (n,) int64, to
    name the first bad row (``x.parquet: embedding: row id 17 has length 3, expected 4``).
    NaN and inf are not checked here (see :func:`first_nonfinite`).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        valid = np.asarray(column.is_valid())
        raise DataValueError(f"{source}: embedding is missing for id {int(ids[np.argmin(valid)])}")
    n = len(column)
    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        bad = lengths != dim
        if bad.any():
            i = int(np.argmax(bad))
            raise DataValueError(
                f"{source}: embedding: row id {int(ids[i])} has length {int(lengths[i])}, expected {dim}"
            )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(n, dim), dtype=np.float32)


def first_nonfinite(ids: np.ndarray, emb: np.ndarray) -> int | None:
    """The id of the first row of emb (n, D) holding NaN or inf, or None."""
    return _first_nonfinite(ids, emb)


def first_row_dim(column: pa.Array | pa.ChunkedArray, ids: np.ndarray, source: str) -> int:
    """D of a list<float> column: the length of its first row (a missing or empty first row
    is a DataValueError naming its id)."""
    if len(column) == 0:
        raise DataValueError(f"{source}: embedding: no rows, so D is unknown")
    first = column[0]
    if not first.is_valid:
        raise DataValueError(f"{source}: embedding is missing for id {int(ids[0])}")
    d = len(first.values)
    if d == 0:
        raise DataValueError(
            f"{source}: embedding: row id {int(ids[0])} has length 0, expected a non-empty list of floats"
        )
    return d


def _list_dim(path: Path, pf: pq.ParquetFile) -> int:
    """D of a list-typed embedding column without metadata ``dim``: its first row's length."""
    try:
        batch = next(pf.iter_batches(batch_size=1, columns=["id", "embedding"]), None)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc
    if batch is None:
        raise DataValueError(
            f"{path.name}: embedding: no rows, so D is unknown (a list column needs rows or metadata dim)"
        )
    return first_row_dim(batch.column("embedding"), batch.column("id").to_numpy(zero_copy_only=False), path.name)


def _check_schema(
    path: Path, pf: pq.ParquetFile, expected_dim: int | None, accept_lists: bool = False
) -> tuple[int, dict[str, str], bool]:
    """(D, file metadata, has a path column); D of a list column is read from its first row."""
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
    fixed = embedding_type_dim(schema.field("embedding").type, name, accept_lists)
    raw = schema.metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}
    if fixed is not None:
        dim = fixed
    elif "dim" in meta and meta["dim"].isdigit() and int(meta["dim"]) > 0:
        dim = int(meta["dim"])  # rows are checked against it as they are read
    else:
        dim = _list_dim(path, pf)
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


def _batch_to_table(
    path: Path, batch: pa.RecordBatch | pa.Table, dim: int, meta: dict[str, str], has_path: bool, split: str | None
) -> FeatureTable:
    name = path.name
    if split is not None:
        mask = pc.equal(batch.column("split"), split)
        batch = batch.filter(mask)
    ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
    for col in ("label", "split"):
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
    emb = embedding_array(batch.column("embedding"), ids, dim, name)
    bad = _first_nonfinite(ids, emb)
    if bad is not None:
        raise DataValueError(f"{name}: embedding of id {bad} has NaN or inf values")
    return FeatureTable(ids, labels, splits, paths, emb, dict(meta))


def read_features(
    path: str | os.PathLike, *, split: str | None = None, expected_dim: int | None = None, accept_lists: bool = False
) -> FeatureTable:
    """Read and validate a whole features table (optionally only rows of ``split``).

    accept_lists: also read a list<float*> / large_list<float*> embedding column (see the
    module docstring); without it only fixed_size_list<float*>[D] is accepted.
    """
    path = Path(path)
    pf = _open(path)
    dim, meta, has_path = _check_schema(path, pf, expected_dim, accept_lists)
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


def iter_features(
    path: str | os.PathLike,
    batch_size: int = 65_536,
    split: str | None = None,
    expected_dim: int | None = None,
    accept_lists: bool = False,
) -> Iterator[FeatureTable]:
    """Stream a features table in batches of at most ``batch_size`` rows (after the
    ``split`` filter batches may be smaller; empty ones are skipped). accept_lists: as in
    :func:`read_features`."""
    path = Path(path)
    pf = _open(path)
    dim, meta, has_path = _check_schema(path, pf, expected_dim, accept_lists)
    _check_ids(path, pf)
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            out = _batch_to_table(path, batch, dim, meta, has_path, split)
            if len(out):
                yield out
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc


def iter_embeddings(
    path: str | os.PathLike,
    block_rows: int = 65_536,
    split: str | None = None,
    expected_dim: int | None = None,
    normalise: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The database of a features table as blocks, for top-k searches that stream it:
    ``(ids (n,) int64, embeddings (n, D) float32)`` of at most ``block_rows`` rows each, in
    row order, only rows of ``split`` when given (empty blocks skipped), L2-normalised
    rows when ``normalise``. Reads only the id, split and embedding columns; memory is one
    block. The table's schema is checked first (:func:`iter_features` also reads labels and
    paths)."""
    path = Path(path)
    pf = _open(path)
    dim, _, _ = _check_schema(path, pf, expected_dim)
    columns = ["id", "embedding"] + (["split"] if split is not None else [])
    try:
        for batch in pf.iter_batches(batch_size=block_rows, columns=columns):
            if split is not None:
                batch = batch.filter(pc.equal(batch.column("split"), split))
                if not len(batch):
                    continue
            ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
            emb = embedding_array(batch.column("embedding"), ids, dim, path.name)
            bad = _first_nonfinite(ids, emb)
            if bad is not None:
                raise DataValueError(f"{path.name}: embedding of id {bad} has NaN or inf values")
            if normalise:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            yield ids, emb
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


def lookup_embeddings(
    path: str | os.PathLike, ids: np.ndarray, *, expected_dim: int | None = None, accept_lists: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the rows with these ids: ``(emb (n, D) float32, found (n,) bool)``, in
    the order of ``ids``; rows not in the table are zero with ``found`` False.

    Reads only the ``id`` and ``embedding`` columns of the row groups whose id statistics
    overlap [min(ids), max(ids)], so a lookup costs about the rows asked for, not the whole
    table, when the table is stored in id order (as tables written from sorted ids are).
    The rows read are checked: no duplicate ids, no NaN or inf (and, for a list column read
    with ``accept_lists``, length D).
    """
    path = Path(path)
    pf = _open(path)
    dim, _, _ = _check_schema(path, pf, expected_dim, accept_lists)
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
        batches = (
            pf.iter_batches(
                batch_size=max(1024, LOOKUP_BATCH_BYTES // (4 * dim)), row_groups=groups, columns=["id", "embedding"]
            )
            if groups
            else []
        )
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
            values = embedding_array(batch.column("embedding"), bids, dim, path.name)[hit]
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


def read_ids(path: str | os.PathLike, *, accept_lists: bool = False, split: str | None = None) -> np.ndarray:
    """The ids (N,) int64 of a features table in row order (validates the schema and the
    ids; reads no embeddings, except the first row of a list column without metadata dim);
    with ``split``, only those of its rows (the rows :func:`iter_embeddings` yields)."""
    path = Path(path)
    pf = _open(path)
    _check_schema(path, pf, None, accept_lists)
    ids = _check_ids(path, pf)
    if split is None:
        return ids
    mask = pc.equal(pf.read(columns=["split"]).column("split"), split).to_numpy(zero_copy_only=False)
    if not mask.any():
        raise DataValueError(f"{path.name}: no rows with split '{split}'")
    return ids[mask.astype(bool)]


def read_metadata(path: str | os.PathLike, *, accept_lists: bool = False) -> dict[str, str]:
    """The file metadata of a features table (validates the schema, reads no rows, except
    the first row of a list column without metadata dim)."""
    path = Path(path)
    pf = _open(path)
    return _check_schema(path, pf, None, accept_lists)[1]


def features_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the features file (identifies the exact features a store was built from)."""
    return file_sha256(path)
