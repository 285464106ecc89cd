"""Users' own embeddings: few-shot tables and retrieval folders, imported into the
project's canonical features tables (:mod:`storage.features`).

Few-shot table (``data_root``): one Parquet file, or a folder of ``*.parquet`` (read in
name order), as pandas (``df.to_parquet`` with a column of numpy rows: list<double> or
list<float>), polars or pyarrow write it, with no project metadata. Columns: ``id`` (int),
``label`` (int or string), ``split`` (``train`` / ``val`` / ``test``), ``embedding``
(list, large_list or fixed_size_list of floats, any D), optional ``path`` (kept when every
file has it); other columns are ignored. :func:`import_fewshot_table` streams it into one
canonical table (fixed_size_list<float32>[D]).

Retrieval folder (``data_root``): ``train.parquet`` (``label`` = cluster or class),
``queries.parquet`` and ``database.parquet`` (``id``, ``embedding``, optional ``label``
and ``path``), and the ground truth ``gnd.pkl`` or ``gnd.json`` in the revisitop format
(indices are database rows in file order), or neither: then a query's positives are the
database items with its label. :func:`import_retrieval_folder` turns it into the tables
:mod:`storage.landmark_tables` makes of rOxford5k + SfM-120k, so the retrieval pipeline
consumes both the same way.

Imports are done once: an output is named after a key of its source files (resolved path,
size and modification time in ns of each, plus the import parameters), so a source
rewritten in place gets a new output and an unchanged one reuses the old. The key is not a
content hash: hashing a few GB of embeddings would cost more than the import itself; a
file changed without changing its size or ns mtime is not noticed. Every output is written
under a temporary name and renamed when complete.

Errors are one line naming the file and the field or id, e.g. ``x.parquet: embedding:
row id 17 has length 3, expected 4``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import CorruptFileError, DatasetLayoutError, DataValueError, SchemaError, StorageError
from storage.features import (
    READ_BUFFER,
    FeatureTableWriter,
    embedding_array,
    embedding_type_dim,
    first_nonfinite,
    first_row_dim,
    read_metadata,
)
from storage.landmark_tables import TRAIN_TABLE, LandmarkTestSet, LandmarkTrainSet, build_once, holdout_clusters
from storage.landmarks import RevisitedGroundTruth, read_gnd, write_gnd_json

FEWSHOT_SPLITS = ("train", "val", "test")
FEWSHOT_COLUMNS = ("id", "label", "split", "embedding")
RETRIEVAL_FILES = ("train.parquet", "queries.parquet", "database.parquet")
GND_FILES = ("gnd.pkl", "gnd.json")
IMPORT_VERSION = "1"  # part of every output key: bump when the output format changes
BATCH_BYTES = 64 << 20  # float64 values per streamed batch, about


# ---------------------------------------------------------------------------------------
# reading users' Parquet files


@dataclass
class _UserFile:
    """One user Parquet file: its open handle, D and which optional columns it has."""

    path: Path
    pf: pq.ParquetFile
    dim: int
    n_rows: int
    columns: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path.name

    def has(self, column: str) -> bool:
        return column in self.columns


def _open_user(path: Path, required: Sequence[str], expected: str) -> _UserFile:
    """Open ``path`` and check the columns in ``required`` are there with usable types.

    expected: the layout for error messages (``id, label, split, embedding``)."""
    if not path.is_file():
        raise StorageError(f"{path}: not found (expected a Parquet file with columns {expected})")
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)  # see storage.features.READ_BUFFER
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable Parquet file (truncated or wrong format: {exc})") from exc
    schema = pf.schema_arrow
    for col in required:
        if col not in schema.names:
            raise SchemaError(f"{path.name}: missing column '{col}' (expected columns {expected})")
    t = schema.field("id").type
    if not pa.types.is_integer(t):
        raise SchemaError(f"{path.name}: id has type {t}, expected integers")
    if "label" in schema.names:
        t = _value_type(schema.field("label").type)
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise SchemaError(f"{path.name}: label has type {t}, expected int or string")
    if "split" in schema.names and not _is_text(schema.field("split").type):
        raise SchemaError(f"{path.name}: split has type {schema.field('split').type}, expected string")
    if "path" in schema.names and not _is_text(schema.field("path").type):
        raise SchemaError(f"{path.name}: path has type {schema.field('path').type}, expected string")
    fixed = embedding_type_dim(schema.field("embedding").type, path.name, accept_lists=True)
    n_rows = pf.metadata.num_rows
    dim = fixed if fixed is not None else _first_row_dim(path, pf)
    return _UserFile(path, pf, dim, n_rows, tuple(schema.names))


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    t = _value_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _first_row_dim(path: Path, pf: pq.ParquetFile) -> int:
    try:
        batch = next(pf.iter_batches(batch_size=1, columns=["id", "embedding"]), None)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read rows (truncated or corrupt: {exc})") from exc
    if batch is None:
        raise DataValueError(f"{path.name}: no rows (expected at least one embedding)")
    return first_row_dim(batch.column("embedding"), batch.column("id").to_numpy(zero_copy_only=False), path.name)


def _read_columns(uf: _UserFile, columns: Sequence[str]) -> dict[str, pa.Array]:
    """Whole small columns (id, label, split) of a user file, one array each."""
    try:
        table = uf.pf.read(columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{uf.path}: cannot read columns {list(columns)} (truncated or corrupt: {exc})") from exc
    return {c: table.column(c).combine_chunks() for c in columns}


def _ids(uf: _UserFile, col: pa.Array) -> np.ndarray:
    """(N,) int64 ids, checked: none missing, none duplicated within the file."""
    if col.null_count:
        row = int(np.argmin(np.asarray(col.is_valid())))
        raise DataValueError(f"{uf.name}: id is missing in row {row}")
    try:
        ids = col.cast(pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        raise DataValueError(f"{uf.name}: id does not fit in int64 ({exc})") from exc
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise DataValueError(f"{uf.name}: id {int(uniq[counts > 1][0])} is duplicated; ids must be unique")
    return ids


def _labels(uf: _UserFile, col: pa.Array, ids: np.ndarray) -> pa.Array:
    """Labels as int64 or string (dictionary-encoded columns decoded), none missing."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataValueError(f"{uf.name}: label is missing for id {int(ids[np.argmin(np.asarray(col.is_valid()))])}")
    return col.cast(pa.int64() if pa.types.is_integer(col.type) else pa.string())


def _text(col: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)


def _batch_rows(dim: int) -> int:
    return max(1024, BATCH_BYTES // (8 * dim))


def _embedding_batches(uf: _UserFile, extra: Sequence[str] = ()) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) of the ``embedding`` (+ ``extra``) columns, in row order."""
    start = 0
    try:
        for batch in uf.pf.iter_batches(batch_size=_batch_rows(uf.dim), columns=["embedding", *extra]):
            yield start, batch
            start += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{uf.path}: cannot read rows (truncated or corrupt: {exc})") from exc


def _copy_rows(
    uf: _UserFile,
    writer: FeatureTableWriter,
    *,
    ids: np.ndarray,
    out_ids: np.ndarray,
    labels: pa.Array,
    splits: np.ndarray | str,
) -> None:
    """Stream the embeddings of ``uf`` into ``writer``, checked batch by batch (length D,
    no NaN/inf, naming the user's id). ids: (N,) the user's ids (for messages); out_ids,
    labels, splits: (N,) what is written for each row (splits may be one str)."""
    extra = ["path"] if writer.has_path else []
    for start, batch in _embedding_batches(uf, extra):
        stop = start + batch.num_rows
        rows = slice(start, stop)
        emb = embedding_array(batch.column("embedding"), ids[rows], uf.dim, uf.name)
        bad = first_nonfinite(ids[rows], emb)
        if bad is not None:
            raise DataValueError(f"{uf.name}: embedding of id {bad} has NaN or inf values")
        paths = None
        if writer.has_path:
            paths = batch.column("path")
            if paths.null_count:
                i = int(np.argmin(np.asarray(paths.is_valid())))
                raise DataValueError(f"{uf.name}: path is missing for id {int(ids[start + i])}")
        writer.write(
            ids=out_ids[rows],
            labels=labels.slice(start, batch.num_rows),
            splits=splits if isinstance(splits, str) else splits[rows].tolist(),
            embeddings=emb,
            paths=paths,
        )


def _source_key(files: Sequence[Path], extra: str = "") -> str:
    """16 hex digits naming an import: resolved path, size and ns mtime of each file."""
    h = hashlib.sha256(f"v{IMPORT_VERSION}|{extra}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _common_label_type(files: Sequence[tuple[_UserFile, pa.Array]]) -> pa.DataType:
    first_uf, first = files[0]
    for uf, labels in files[1:]:
        if labels.type != first.type:
            raise SchemaError(
                f"{uf.name}: label has type {labels.type}, but {first_uf.name} has {first.type}; "
                "labels must be all int or all string"
            )
    return first.type


def _check_same_dim(files: Sequence[_UserFile], what: str) -> int:
    first = files[0]
    for uf in files[1:]:
        if uf.dim != first.dim:
            raise SchemaError(
                f"{uf.name}: embedding has D={uf.dim}, but {first.name} has D={first.dim}; {what} must have the same D"
            )
    return first.dim


# ---------------------------------------------------------------------------------------
# few-shot tables


@dataclass(frozen=True)
class ImportedTable:
    """A user's few-shot table as a canonical features table.

    path: the table (``<out_dir>/<source name>-<key>.parquet``); dim: D; n_rows: rows;
    counts: rows per split (train, val, test; 0 where a split has none).
    """

    path: Path
    dim: int
    n_rows: int
    counts: dict[str, int]


def fewshot_sources(src: str | os.PathLike) -> list[Path]:
    """The Parquet files of a few-shot table: ``src`` itself, or the ``*.parquet`` files of
    the folder ``src`` in name order (hidden files skipped)."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise StorageError(f"{src}: not found (expected a Parquet file or a folder of *.parquet)")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix == ".parquet" and not p.name.startswith("."))
    if not files:
        raise DatasetLayoutError(
            f"{src}: no *.parquet files (expected a Parquet file or a folder of them with columns "
            f"{', '.join(FEWSHOT_COLUMNS)})"
        )
    return files


def fewshot_output_path(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Where :func:`import_fewshot_table` puts the import of ``src``."""
    src = Path(src)
    stem = src.stem if src.is_file() else src.name
    return Path(out_dir) / f"{stem}-{_source_key(fewshot_sources(src))}.parquet"


def import_fewshot_table(src: str | os.PathLike, out_dir: str | os.PathLike) -> ImportedTable:
    """Import a user's few-shot embeddings table (see the module docstring) into
    ``<out_dir>/<source name>-<key>.parquet``, a canonical features table: ``id`` (the
    user's ids), ``label``, ``split``, optional ``path``, ``embedding``
    fixed_size_list<float32>[D]; metadata ``dataset`` (source name), ``backbone`` and
    ``checkpoint_hash`` ``none``, ``dim``, ``source``, ``source_hash`` (the key),
    ``split_counts``. Skipped when that file exists.

    Two passes: the small columns (id, label, split) of every file are read and checked
    first (missing columns, unknown splits, duplicate ids over all files, D and label type
    equal over all files); then the embeddings are streamed batch by batch (memory: one
    batch, about 64 MB, plus the small columns), checked (length D, no NaN/inf) and
    written atomically.
    """
    files = fewshot_sources(src)
    out = fewshot_output_path(src, out_dir)
    if out.is_file():
        return _imported(out)
    expected = f"{', '.join(FEWSHOT_COLUMNS)} (+ optional path)"
    users = [_open_user(f, FEWSHOT_COLUMNS, expected) for f in files]
    dim = _check_same_dim(users, f"the files of {Path(src).name}")
    cols = [_read_columns(uf, ["id", "label", "split"]) for uf in users]
    ids = [_ids(uf, c["id"]) for uf, c in zip(users, cols)]
    _check_ids_across(users, ids)
    labels = [_labels(uf, c["label"], i) for uf, c, i in zip(users, cols, ids)]
    label_type = _common_label_type(list(zip(users, labels)))
    splits = [_fewshot_splits(uf, c["split"], i) for uf, c, i in zip(users, cols, ids)]
    counts = {s: int(sum((sp == s).sum() for sp in splits)) for s in FEWSHOT_SPLITS}
    has_path = all(uf.has("path") for uf in users)
    src_path = Path(src).resolve()
    meta = {
        "dataset": src_path.stem if src_path.is_file() else src_path.name,
        "backbone": "none",
        "checkpoint_hash": "none",
        "source": str(src_path),
        "source_hash": out.stem.rsplit("-", 1)[1],
        "split_counts": json.dumps(counts),
    }
    with FeatureTableWriter(out, dim=dim, label_type=label_type, metadata=meta, has_path=has_path) as writer:
        for uf, i, lab, sp in zip(users, ids, labels, splits):
            _copy_rows(uf, writer, ids=i, out_ids=i, labels=lab, splits=sp)
    return _imported(out)


def _imported(path: Path) -> ImportedTable:
    meta = read_metadata(path)
    counts = {s: int(v) for s, v in json.loads(meta["split_counts"]).items()}
    return ImportedTable(path, int(meta["dim"]), sum(counts.values()), counts)


def _check_ids_across(users: Sequence[_UserFile], ids: Sequence[np.ndarray]) -> None:
    if len(users) < 2:
        return
    all_ids = np.concatenate(ids)
    uniq, counts = np.unique(all_ids, return_counts=True)
    if len(uniq) == len(all_ids):
        return
    dup = int(uniq[counts > 1][0])
    where = [uf.name for uf, i in zip(users, ids) if (i == dup).any()]
    raise DataValueError(f"{where[-1]}: id {dup} is duplicated (also in {where[0]}); ids must be unique over all files")


def _fewshot_splits(uf: _UserFile, col: pa.Array, ids: np.ndarray) -> np.ndarray:
    if col.null_count:
        raise DataValueError(f"{uf.name}: split is missing for id {int(ids[np.argmin(np.asarray(col.is_valid()))])}")
    splits = _text(col)
    bad = ~np.isin(splits, FEWSHOT_SPLITS)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataValueError(
            f"{uf.name}: split: unknown value {splits[i]!r} at id {int(ids[i])} "
            f"(expected one of {', '.join(FEWSHOT_SPLITS)})"
        )
    return splits


def usable_classes(labels: Sequence | np.ndarray, min_count: int) -> tuple[list, dict]:
    """Which classes have at least ``min_count`` (n_shot + n_query) items.

    labels: (N,) one label per item of a split. Returns (usable: the labels with >=
    min_count items, sorted; left_out: label -> count for the others, fewest last).
    """
    uniq, counts = np.unique(np.asarray(labels), return_counts=True)
    usable = [v.item() if hasattr(v, "item") else v for v in uniq[counts >= min_count]]
    order = np.argsort(-counts, kind="stable")
    left_out = {
        (uniq[i].item() if hasattr(uniq[i], "item") else uniq[i]): int(counts[i])
        for i in order
        if counts[i] < min_count
    }
    return usable, left_out


def check_usable(split_name: str, labels: Sequence | np.ndarray, n_way: int, min_count: int, source: str) -> list:
    """The usable classes of a split (:func:`usable_classes`); a DataValueError when fewer
    than ``n_way`` remain: ``<source>: split 'test' has 3 classes with >= 16 items, n_way
    is 5 (left out: a (4), b (2))``."""
    usable, left_out = usable_classes(labels, min_count)
    if len(usable) < n_way:
        shown = [f"{k} ({v})" for k, v in list(left_out.items())[:10]]
        if len(left_out) > 10:
            shown.append(f"... {len(left_out) - 10} more")
        raise DataValueError(
            f"{source}: split '{split_name}' has {len(usable)} classes with >= {min_count} items, "
            f"n_way is {n_way} (left out: {', '.join(shown) or 'none'})"
        )
    return usable


# ---------------------------------------------------------------------------------------
# retrieval folders


@dataclass(frozen=True)
class OwnRetrievalSet:
    """A checked retrieval folder (no embeddings loaded).

    train / queries / database: the three Parquet files; dim: their common D; n_*: rows;
    gnd_path: the ground-truth file, or None when positives are label matches;
    ground_truth: per query, database row indices (``easy``; ``hard`` / ``junk`` as the
    file says, or empty for label matches) over ``n_database`` rows.
    """

    root: Path
    train: Path
    queries: Path
    database: Path
    dim: int
    n_train: int
    n_queries: int
    n_database: int
    gnd_path: Path | None
    ground_truth: RevisitedGroundTruth


def label_ground_truth(
    query_labels: Sequence | np.ndarray,
    db_labels: Sequence | np.ndarray,
    *,
    query_names: Sequence[str] | None = None,
    db_names: Sequence[str] | None = None,
    source: str = "labels",
) -> RevisitedGroundTruth:
    """Revisitop-format ground truth from labels: query q's ``easy`` positives are the
    database rows with its label (ascending), ``hard`` and ``junk`` are empty, ``bbx`` None.

    query_labels: (Q,); db_labels: (N,) of the same kind (int or str); names: Q / N image
    names for ``qimlist`` / ``imlist`` (default: row numbers). A query without any positive
    is a DataValueError naming ``source`` and the query.
    """
    q = np.asarray(query_labels)
    db = np.asarray(db_labels)
    if len(q) and len(db) and (q.dtype.kind in "iu") != (db.dtype.kind in "iu"):
        raise SchemaError(
            f"{source}: query labels are {q.dtype} but database labels are {db.dtype}; "
            "expected the same kind (int or string)"
        )
    uniq, inverse = np.unique(db, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # database rows grouped by label, ascending in each
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    pos = np.minimum(np.searchsorted(uniq, q), max(len(uniq) - 1, 0))
    empty = np.zeros(0, np.int64)
    gnd = []
    for qi, (label, p) in enumerate(zip(q.tolist(), pos.tolist())):
        if not len(uniq) or uniq[p] != label:
            name = query_names[qi] if query_names is not None else qi
            raise DataValueError(
                f"{source}: query {name} has label {label!r}, which no database item has; "
                "every query needs at least one positive"
            )
        gnd.append(
            {"easy": order[bounds[p] : bounds[p + 1]].astype(np.int64), "hard": empty, "junk": empty, "bbx": None}
        )
    imlist = list(db_names) if db_names is not None else [str(i) for i in range(len(db))]
    qimlist = list(query_names) if query_names is not None else [str(i) for i in range(len(q))]
    return RevisitedGroundTruth(imlist, qimlist, gnd)


def _retrieval_files(root: Path) -> tuple[Path, Path, Path, Path | None]:
    if not root.is_dir():
        raise StorageError(
            f"{root}: not a folder (expected {', '.join(RETRIEVAL_FILES)} and optionally gnd.pkl or gnd.json)"
        )
    train, queries, database = (root / name for name in RETRIEVAL_FILES)
    for f in (train, queries, database):
        if not f.is_file():
            raise DatasetLayoutError(
                f"{f}: not found (a retrieval folder holds {', '.join(RETRIEVAL_FILES)} "
                "and optionally gnd.pkl or gnd.json)"
            )
    gnds = [root / g for g in GND_FILES if (root / g).is_file()]
    if len(gnds) > 1:
        raise DatasetLayoutError(f"{root}: both gnd.pkl and gnd.json; keep the one that is the ground truth")
    return train, queries, database, gnds[0] if gnds else None


def _names(uf: _UserFile, cols: dict[str, pa.Array], ids: np.ndarray) -> list[str]:
    """Image names of a queries/database file: its ``path`` column, else its ids as text."""
    if "path" in cols:
        paths = _text(cols["path"])
        if any(p is None for p in paths):
            i = next(i for i, p in enumerate(paths) if p is None)
            raise DataValueError(f"{uf.name}: path is missing for id {int(ids[i])}")
        return [str(p) for p in paths]
    return [str(int(i)) for i in ids]


def _open_retrieval(
    root: str | os.PathLike,
) -> tuple[OwnRetrievalSet, dict[str, tuple[_UserFile, np.ndarray, pa.Array | None]]]:
    root = Path(root)
    train_p, queries_p, database_p, gnd_p = _retrieval_files(root)
    need_label = gnd_p is None
    tr = _open_user(train_p, ("id", "label", "embedding"), "id, label (cluster), embedding (+ optional path)")
    qexp = f"id, {'label, ' if need_label else ''}embedding (+ optional {'' if need_label else 'label, '}path)"
    files = {"train": tr}
    for key, p in (("queries", queries_p), ("database", database_p)):
        required = ("id", "label", "embedding") if need_label else ("id", "embedding")
        try:
            files[key] = _open_user(p, required, qexp)
        except SchemaError as exc:
            if need_label and "missing column 'label'" in str(exc):
                raise SchemaError(
                    f"{exc}; without gnd.pkl or gnd.json in {root} the positives of a query are the "
                    "database items with its label"
                ) from None
            raise
    dim = _check_same_dim([files["train"], files["queries"], files["database"]], "train, queries and database")
    loaded: dict[str, tuple[_UserFile, np.ndarray, pa.Array | None]] = {}
    names: dict[str, list[str]] = {}
    for key, uf in files.items():
        cols = _read_columns(uf, [c for c in ("id", "label", "path") if uf.has(c)])
        ids = _ids(uf, cols["id"])
        labels = _labels(uf, cols["label"], ids) if "label" in cols else None
        loaded[key] = (uf, ids, labels)
        if key != "train":
            names[key] = _names(uf, cols, ids)
    q_uf, db_uf = files["queries"], files["database"]
    if gnd_p is not None:
        gt = read_gnd(gnd_p, n_db=db_uf.n_rows)
        if len(gt.qimlist) != q_uf.n_rows:
            raise DataValueError(
                f"{gnd_p}: qimlist has {len(gt.qimlist)} queries, but {q_uf.name} has {q_uf.n_rows} rows"
            )
        if not gt.imlist:
            gt = RevisitedGroundTruth(names["database"], gt.qimlist, gt.gnd)
    else:
        q_labels, db_labels = loaded["queries"][2], loaded["database"][2]
        assert q_labels is not None and db_labels is not None  # required columns without a gnd file
        if q_labels.type != db_labels.type:
            raise SchemaError(
                f"{q_uf.name}: label has type {q_labels.type}, but {db_uf.name} has {db_labels.type}; "
                "positives are label matches, so both need the same kind of label"
            )
        gt = label_ground_truth(
            _np_labels(q_labels),
            _np_labels(db_labels),
            query_names=names["queries"],
            db_names=names["database"],
            source=f"{root.name}/{q_uf.name}",
        )
    own = OwnRetrievalSet(root, train_p, queries_p, database_p, dim, tr.n_rows, q_uf.n_rows, db_uf.n_rows, gnd_p, gt)
    return own, loaded


def _np_labels(labels: pa.Array) -> np.ndarray:
    if pa.types.is_integer(labels.type):
        return labels.to_numpy(zero_copy_only=False)
    return np.asarray(labels.to_pylist(), dtype=object)


def read_retrieval_folder(root: str | os.PathLike) -> OwnRetrievalSet:
    """Check a retrieval folder (module docstring) without reading its embeddings: the
    three files and their columns, one D for all three (``queries.parquet: embedding has
    D=4, but train.parquet has D=8; ...``), unique ids, the ground truth (indices inside
    the database, one entry per query row) or, without a gnd file, a label for every query
    and database row and at least one positive per query. Embedding values (length D, NaN)
    are checked when they are imported."""
    return _open_retrieval(root)[0]


@dataclass(frozen=True)
class ImportedRetrieval:
    """A retrieval folder as the tables :mod:`storage.landmark_tables` makes: ``test``
    (database ids 0..N-1 in file order = ground-truth order, query ids 0..Q-1, gnd.json)
    and ``train`` (label = cluster, split ``train`` / ``val`` for the held-out clusters)."""

    test: LandmarkTestSet
    train: LandmarkTrainSet


def import_retrieval_folder(
    root: str | os.PathLike, cache_dir: str | os.PathLike, *, holdout_fraction: float = 0.05, holdout_seed: int = 0
) -> ImportedRetrieval:
    """Import a retrieval folder once into ``cache_dir``.

    Test folder ``<root name>-test-<key>`` (key of queries, database and gnd file):
    ``database.parquet`` (ids 0..N-1 in file order, split ``database``, label = the user's
    or -1, path = the user's where given), ``query.parquet`` (ids 0..Q-1, split ``query``)
    and ``gnd.json`` (imlist / qimlist = the files' paths, else their ids). Train folder
    ``<root name>-train-<key>`` (key of train.parquet and the hold-out):
    ``train.parquet`` with the user's ids, label = cluster and split ``val`` for the clusters
    :func:`storage.landmark_tables.holdout_clusters` holds out, ``train`` for the rest.
    Embeddings are streamed (one batch in memory) and checked as they are copied.
    """
    root = Path(root)
    train_p, queries_p, database_p, gnd_p = _retrieval_files(root)
    cache = Path(cache_dir)
    name = root.resolve().name
    test_key = _source_key([queries_p, database_p, *([gnd_p] if gnd_p is not None else [])], "test")
    train_key = _source_key([train_p], f"train|{holdout_fraction}|{holdout_seed}")
    test_dir, train_dir = cache / f"{name}-test-{test_key}", cache / f"{name}-train-{train_key}"
    if not (test_dir.is_dir() and train_dir.is_dir()):
        _import_retrieval(root, test_dir, train_dir, test_key, train_key, holdout_fraction, holdout_seed)
    db, q, gnd = test_dir / "database.parquet", test_dir / "query.parquet", test_dir / "gnd.json"
    table = train_dir / TRAIN_TABLE
    splits = pq.read_table(table, columns=["split"]).column("split").to_numpy(zero_copy_only=False)
    n_val = int((splits == "val").sum())
    return ImportedRetrieval(
        LandmarkTestSet(db, q, gnd, int(read_metadata(db)["dim"])),
        LandmarkTrainSet(
            table, int(read_metadata(table)["dim"]), len(splits) - n_val, n_val, holdout_fraction, holdout_seed
        ),
    )


def _import_retrieval(
    root: Path,
    test_dir: Path,
    train_dir: Path,
    test_key: str,
    train_key: str,
    holdout_fraction: float,
    holdout_seed: int,
) -> None:
    own, loaded = _open_retrieval(root)
    meta = {
        "dataset": root.resolve().name,
        "backbone": "none",
        "checkpoint_hash": "none",
        "source": str(own.root.resolve()),
    }

    def build_test(tmp: Path) -> None:
        for key, out_name, split in (
            ("database", "database.parquet", "database"),
            ("queries", "query.parquet", "query"),
        ):
            uf, ids, labels = loaded[key]
            n = len(ids)
            if labels is None:
                labels = pa.array(np.full(n, -1, np.int64))
            with FeatureTableWriter(
                tmp / out_name,
                dim=own.dim,
                label_type=labels.type,
                has_path=uf.has("path"),
                metadata={**meta, "source_hash": test_key, "source_file": uf.name},
            ) as writer:
                _copy_rows(uf, writer, ids=ids, out_ids=np.arange(n, dtype=np.int64), labels=labels, splits=split)
        write_gnd_json(tmp / "gnd.json", own.ground_truth)

    def build_train(tmp: Path) -> None:
        uf, ids, labels = loaded["train"]
        assert labels is not None  # a required column of train.parquet
        clusters = _np_labels(labels)
        held = holdout_clusters(clusters, holdout_fraction, holdout_seed)
        if held.all() or not held.any():
            n = len(np.unique(clusters))
            raise DataValueError(
                f"{uf.name}: label: holding out {holdout_fraction:g} of {n} clusters leaves "
                f"{'no training' if held.all() else 'no validation'} cluster; expected more clusters"
            )
        with FeatureTableWriter(
            tmp / TRAIN_TABLE,
            dim=own.dim,
            label_type=labels.type,
            has_path=uf.has("path"),
            metadata={
                **meta,
                "source_hash": train_key,
                "source_file": uf.name,
                "holdout_fraction": str(holdout_fraction),
                "holdout_seed": str(holdout_seed),
            },
        ) as writer:
            _copy_rows(uf, writer, ids=ids, out_ids=ids, labels=labels, splits=np.where(held, "val", "train"))

    build_once(test_dir, build_test)
    build_once(train_dir, build_train)
