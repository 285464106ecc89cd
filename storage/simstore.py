"""Top-k similarity store: a directory of Parquet shards plus ``_manifest.json``.

Shard rows: ``query_id`` int64, ``neighbor_ids`` fixed_size_list<int64>[K] (best first),
``scores`` fixed_size_list<float32>[K]; each shard's file metadata holds ``ssr.k``,
``ssr.method``, ``ssr.format`` and ``ssr.version``. The manifest records K, the number of
queries, the shard count and size, the hashes of the source features, the database id bound
and, per shard, ``{file, first_row, n_rows, complete, sha256}``. Shard i holds query rows
``[i * shard_size, min((i + 1) * shard_size, n_queries))``. The manifest's name starts with
``_``, so the folder reads as one Parquet dataset (``pyarrow.dataset.dataset(store_dir)``,
DuckDB ``read_parquet('store_dir/*.parquet')``). Stores of version 1 (``manifest.json``,
variable-length lists) are still read; their manifest is renamed on open.

Writers: ``write_shard`` may run in parallel processes (it only writes its own part
file); ``mark_complete`` rewrites the manifest and belongs to one driver process.
``build_topk_store`` fills (or resumes) a store from query and database arrays with the
search of ``storage.topk``; an IVF store also keeps its centroids (``ivf-centroids.npy``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import atomic_path, atomic_write_text
from storage.errors import CorruptFileError, DataValueError, ManifestError, SchemaError
from storage.features import features_hash, iter_embeddings, read_features, read_ids, read_metadata
from storage.hashing import file_sha256
from storage.topk import TopkSearch, ivf_index, row_blocks, topk_search, train_ivf_centroids

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # version 1: pyarrow took it for a data file
FORMAT = "ssr-topk-store"
VERSION = 2
COLUMNS = ("query_id", "neighbor_ids", "scores")


def shard_file(i: int) -> str:
    return f"part-{i:05d}.parquet"


@dataclass
class Shard:
    """One shard's rows. query_ids: (n,) int64; neighbor_ids: (n, K) int64, best first;
    scores: (n, K) float32, non-increasing along each row for a fresh top-k store."""

    index: int
    query_ids: np.ndarray
    neighbor_ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.query_ids)


def shard_schema(k: int, method: str) -> pa.Schema:
    """The Arrow schema of every shard of a store with K neighbours (file metadata included)."""
    return pa.schema(
        [("query_id", pa.int64()), ("neighbor_ids", pa.list_(pa.int64(), k)), ("scores", pa.list_(pa.float32(), k))],
        metadata={"ssr.k": str(k), "ssr.method": method, "ssr.format": FORMAT, "ssr.version": str(VERSION)},
    )


def _shard_table(query_ids: np.ndarray, neighbor_ids: np.ndarray, scores: np.ndarray, method: str) -> pa.Table:
    n, k = neighbor_ids.shape
    return pa.Table.from_arrays(
        [
            pa.array(query_ids, type=pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(neighbor_ids.reshape(-1), type=pa.int64()), k),
            pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1), type=pa.float32()), k),
        ],
        schema=shard_schema(k, method),
    )


def _adopt_legacy_manifest(path: Path) -> None:
    """A version-1 store keeps its manifest as ``manifest.json``: rename it (atomic)."""
    legacy = path / LEGACY_MANIFEST
    if legacy.is_file() and not (path / MANIFEST).exists():
        os.replace(legacy, path / MANIFEST)


class SimilarityStore:
    """An opened similarity store; the manifest is validated on open.

    n_db: if given (else the manifest's ``n_db``), neighbour ids must lie in [0, n_db).
    """

    def __init__(self, path: str | os.PathLike, *, n_db: int | None = None) -> None:
        self.path = Path(path)
        _adopt_legacy_manifest(self.path)
        self.manifest = self._load_manifest()
        self.n_db = n_db if n_db is not None else self.manifest.get("n_db")

    # ---- manifest -------------------------------------------------------------------
    def _mpath(self) -> Path:
        return self.path / MANIFEST

    def _err(self, msg: str) -> ManifestError:
        return ManifestError(f"{self._mpath()}: {msg}")

    def _load_manifest(self) -> dict[str, Any]:
        mpath = self._mpath()
        if not mpath.is_file():
            raise ManifestError(f"{mpath}: manifest not found (is {self.path} a similarity store?)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{mpath}: not valid JSON ({exc})") from exc
        if not isinstance(m, dict):
            raise self._err("expected a JSON object")
        for key, typ in (
            ("k", int),
            ("n_queries", int),
            ("n_shards", int),
            ("shard_size", int),
            ("source_hashes", dict),
            ("shards", list),
        ):
            if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
                raise self._err(f"field '{key}' missing or not {typ.__name__}")
        if m["k"] < 1 or m["shard_size"] < 1 or m["n_queries"] < 0:
            raise self._err("k and shard_size must be >= 1, n_queries >= 0")
        if m["n_shards"] != math.ceil(m["n_queries"] / m["shard_size"]):
            raise self._err(
                f"n_shards {m['n_shards']} does not match n_queries {m['n_queries']} / shard_size {m['shard_size']}"
            )
        if len(m["shards"]) != m["n_shards"]:
            raise self._err(f"lists {len(m['shards'])} shards, but n_shards is {m['n_shards']}")
        for i, info in enumerate(m["shards"]):
            first, n_rows = i * m["shard_size"], min(m["shard_size"], m["n_queries"] - i * m["shard_size"])
            if not isinstance(info, dict) or info.get("file") != shard_file(i):
                raise self._err(f"shard {i}: expected file '{shard_file(i)}', got {info!r}")
            if info.get("first_row") != first or info.get("n_rows") != n_rows:
                raise self._err(
                    f"shard {i} ({shard_file(i)}): first_row/n_rows {info.get('first_row')}/"
                    f"{info.get('n_rows')}, expected {first}/{n_rows}"
                )
            if not isinstance(info.get("complete"), bool):
                raise self._err(f"shard {i} ({shard_file(i)}): field 'complete' missing or not bool")
        listed = {shard_file(i) for i in range(m["n_shards"])}
        strays = sorted(p.name for p in self.path.glob("part-*.parquet") if p.name not in listed)
        if strays:
            raise self._err(f"directory holds {strays[0]} but the manifest lists only {m['n_shards']} shards")
        return m

    def _write_manifest(self) -> None:
        atomic_write_text(self._mpath(), json.dumps(self.manifest, indent=1, sort_keys=True))

    @property
    def method(self) -> str:
        """What ranked the neighbours: the manifest's ``method``, else the source's method
        (``+ SSR`` when re-ranked), else the top-k search."""
        hashes = self.manifest["source_hashes"]
        search = self.manifest.get("search", {}).get("method", "exact")
        name = self.manifest.get("method") or hashes.get("method") or f"top-k {search}"
        return f"{name} + SSR" if "reranked_by" in hashes else name

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def n_queries(self) -> int:
        return self.manifest["n_queries"]

    @property
    def n_shards(self) -> int:
        return self.manifest["n_shards"]

    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    @property
    def source_hashes(self) -> dict[str, str]:
        return dict(self.manifest["source_hashes"])

    def shard_path(self, i: int) -> Path:
        self._check_index(i)
        return self.path / shard_file(i)

    def shard_rows(self, i: int) -> tuple[int, int]:
        """(first_row, n_rows) of shard i in query order."""
        info = self.manifest["shards"][self._check_index(i)]
        return info["first_row"], info["n_rows"]

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.n_shards:
            raise IndexError(f"{self.path}: shard {i} out of range (store has {self.n_shards} shards)")
        return i

    # ---- completion -----------------------------------------------------------------
    def shard_is_complete(self, i: int) -> bool:
        """Marked complete in the manifest, file present with the recorded row count and
        checksum."""
        info = self.manifest["shards"][self._check_index(i)]
        path = self.path / info["file"]
        if not info["complete"] or not path.is_file():
            return False
        if info.get("sha256") is not None and file_sha256(path) != info["sha256"]:
            return False
        try:
            return pq.ParquetFile(path).metadata.num_rows == info["n_rows"]
        except (pa.ArrowException, OSError):
            return False

    def pending_shards(self) -> list[int]:
        """Shards that still have to be (re)computed."""
        return [i for i in range(self.n_shards) if not self.shard_is_complete(i)]

    def is_complete(self) -> bool:
        return not self.pending_shards()

    # ---- writing --------------------------------------------------------------------
    def write_shard(
        self, i: int, query_ids: np.ndarray, neighbor_ids: np.ndarray, scores: np.ndarray
    ) -> dict[str, Any]:
        """Write shard i atomically and return its manifest entry (does not touch the
        manifest; pass the entry to :meth:`mark_complete` from the driver).

        query_ids: (n,) int; neighbor_ids: (n, K) int; scores: (n, K) finite floats,
        with n the shard's row count.
        """
        first, n_rows = self.shard_rows(i)
        name = shard_file(i)
        qids = np.asarray(query_ids).astype(np.int64, copy=False)
        nids = np.asarray(neighbor_ids).astype(np.int64, copy=False)
        sc = np.asarray(scores, dtype=np.float32)
        if qids.shape != (n_rows,):
            raise SchemaError(f"{name}: query_id has shape {qids.shape}, expected ({n_rows},)")
        for col, arr in (("neighbor_ids", nids), ("scores", sc)):
            if arr.shape != (n_rows, self.k):
                raise SchemaError(f"{name}: {col} has shape {arr.shape}, expected ({n_rows}, {self.k}) (n_rows, K)")
        self._check_values(name, qids, nids, sc)
        with atomic_path(self.path / name) as tmp:
            pq.write_table(_shard_table(qids, nids, sc, self.method), tmp)
        return {
            "file": name,
            "first_row": first,
            "n_rows": n_rows,
            "complete": True,
            "sha256": file_sha256(self.path / name),
        }

    def mark_complete(self, i: int, info: Mapping[str, Any]) -> None:
        """Record shard i as complete (driver only; atomic manifest rewrite)."""
        first, n_rows = self.shard_rows(i)
        if info.get("file") != shard_file(i) or info.get("n_rows") != n_rows or info.get("first_row") != first:
            raise self._err(
                f"shard {i}: entry {dict(info)} does not describe {shard_file(i)} (first_row {first}, n_rows {n_rows})"
            )
        if not (self.path / shard_file(i)).is_file():
            raise self._err(f"shard {i}: {shard_file(i)} does not exist; write it before marking it complete")
        self.manifest["shards"][i] = {**dict(info), "complete": True}
        self._write_manifest()

    # ---- reading --------------------------------------------------------------------
    def _check_values(self, name: str, qids: np.ndarray, nids: np.ndarray, sc: np.ndarray) -> None:
        if self.n_db is not None and nids.size:
            bad = (nids < 0) | (nids >= self.n_db)
            if bad.any():
                r = int(np.argmax(bad.any(axis=1)))
                raise DataValueError(
                    f"{name}: neighbor_ids of query_id {int(qids[r])} has id "
                    f"{int(nids[r][bad[r]][0])} outside [0, {self.n_db})"
                )
        finite = np.isfinite(sc).all(axis=1)
        if not finite.all():
            r = int(np.argmin(finite))
            raise DataValueError(f"{name}: scores of query_id {int(qids[r])} has NaN or inf values")

    def read_shard(self, i: int) -> Shard:
        """Read and validate shard i (must be complete)."""
        info = self.manifest["shards"][self._check_index(i)]
        path = self.path / info["file"]
        if not info["complete"]:
            raise ManifestError(f"{path}: shard {i} is not complete (build or resume the store first)")
        if not path.is_file():
            raise ManifestError(f"{path}: shard {i} is marked complete in the manifest but the file is missing")
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            missing = [c for c in COLUMNS if c not in names]
            extra = [c for c in names if c not in COLUMNS]
            if missing or extra:
                raise SchemaError(
                    f"{path}: columns {names}, expected {list(COLUMNS)} (missing {missing}, extra {extra})"
                )
            if pf.metadata.num_rows != info["n_rows"]:
                raise ManifestError(f"{path}: has {pf.metadata.num_rows} rows, manifest says {info['n_rows']}")
            table = pf.read()
        except (pa.ArrowException, OSError) as exc:
            raise CorruptFileError(f"{path}: not a readable Parquet file (truncated or wrong format: {exc})") from exc
        n, k = table.num_rows, self.k
        types = {"query_id": pa.int64()}
        for col, t in types.items():
            if table.schema.field(col).type != t:
                raise SchemaError(f"{path}: {col} has type {table.schema.field(col).type}, expected {t}")
        arrays = {}
        for col, vtype in (("neighbor_ids", pa.int64()), ("scores", pa.float32())):
            c = table.column(col).combine_chunks()
            if pa.types.is_fixed_size_list(c.type):  # version 2: every row has the list size
                if c.type.list_size != k or c.type.value_type != vtype:
                    raise SchemaError(
                        f"{path}: {col} has type {c.type}, expected fixed_size_list<{vtype}>[{k}] (manifest K)"
                    )
            elif not (pa.types.is_list(c.type) or pa.types.is_large_list(c.type)) or c.type.value_type != vtype:
                raise SchemaError(f"{path}: {col} has type {c.type}, expected fixed_size_list<{vtype}>[{k}]")
            if c.null_count:
                raise DataValueError(f"{path}: {col} has {c.null_count} missing rows")
            lengths = pc.list_value_length(c).to_numpy(zero_copy_only=False)
            if n and (lengths != k).any():
                r = int(np.argmax(lengths != k))
                raise ManifestError(f"{path}: {col} row {r} has length {int(lengths[r])}, manifest K is {k}")
            arrays[col] = c.flatten().to_numpy(zero_copy_only=False).reshape(n, k)
        if table.column("query_id").null_count:
            raise DataValueError(f"{path}: query_id has missing values")
        qids = table.column("query_id").to_numpy().astype(np.int64)
        nids = np.ascontiguousarray(arrays["neighbor_ids"], dtype=np.int64)
        sc = np.ascontiguousarray(arrays["scores"], dtype=np.float32)
        self._check_values(str(path), qids, nids, sc)
        return Shard(i, qids, nids, sc)

    def iter_shards(self) -> Iterator[Shard]:
        """Shards in order, one in memory at a time."""
        for i in range(self.n_shards):
            yield self.read_shard(i)

    def validate(self) -> None:
        """Cheap consistency check of every shard against the manifest (row counts, files
        of complete shards present and matching their checksums)."""
        for i, info in enumerate(self.manifest["shards"]):
            if info["complete"] and not self.shard_is_complete(i):
                raise ManifestError(
                    f"{self.path / info['file']}: marked complete in the manifest but "
                    "missing, truncated or changed (row count or sha256 differ)"
                )


def create_store(
    out_dir: str | os.PathLike,
    k: int,
    n_queries: int,
    n_shards: int,
    shard_size: int,
    source_hashes: Mapping[str, str] | None = None,
    *,
    n_db: int | None = None,
    search: Mapping[str, Any] | None = None,
    method: str | None = None,
) -> SimilarityStore:
    """Create an empty store (manifest with every shard incomplete), or reopen an existing
    one with the same parameters for resume. A different existing store is an error.

    search: how the neighbours were found (``TopkSearch.manifest_entry``); recorded in the
    manifest and, when given, must match on resume. method: the ranking's name, recorded
    in the manifest and in each shard's file metadata (default: see ``SimilarityStore.method``)."""
    out = Path(out_dir)
    _adopt_legacy_manifest(out)
    hashes = {str(a): str(b) for a, b in (source_hashes or {}).items()}
    if k < 1 or shard_size < 1 or n_queries < 0:
        raise ValueError(
            f"{out}: k and shard_size must be >= 1 and n_queries >= 0 (got {k}, {shard_size}, {n_queries})"
        )
    if n_shards != math.ceil(n_queries / shard_size):
        raise ValueError(
            f"{out}: n_shards {n_shards} does not match ceil(n_queries {n_queries} / shard_size {shard_size})"
        )
    if (out / MANIFEST).exists():
        store = SimilarityStore(out)
        want = {
            "k": k,
            "n_queries": n_queries,
            "n_shards": n_shards,
            "shard_size": shard_size,
            "source_hashes": hashes,
            "n_db": n_db,
        }
        if search is not None:
            want["search"] = dict(search)
            store.manifest.setdefault("search", {"method": "exact"})  # stores from before the option
        for key, value in want.items():
            if store.manifest.get(key) != value:
                raise ManifestError(
                    f"{out / MANIFEST}: existing store has {key}={store.manifest.get(key)!r}, "
                    f"requested {value!r}; use a new directory or delete this one"
                )
        return store
    out.mkdir(parents=True, exist_ok=True)
    strays = sorted(p.name for p in out.glob("part-*.parquet"))
    if strays:
        raise ManifestError(f"{out / MANIFEST}: manifest missing but {strays[0]} exists; refusing to mix stores")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "k": k,
        "n_queries": n_queries,
        "n_shards": n_shards,
        "shard_size": shard_size,
        "source_hashes": hashes,
        "n_db": n_db,
        **({"search": dict(search)} if search is not None else {}),
        **({"method": method} if method else {}),
        "shards": [
            {
                "file": shard_file(i),
                "first_row": i * shard_size,
                "n_rows": min(shard_size, n_queries - i * shard_size),
                "complete": False,
            }
            for i in range(n_shards)
        ],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return SimilarityStore(out)


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data.cast("B"))
    return h.hexdigest()


IVF_CENTROIDS = "ivf-centroids.npy"


def _ivf_centroids(path: Path, db: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """The store's IVF centroids (nlist, D): read from ``path``, or trained and saved there
    so that a resumed build searches the same index."""
    D = db.shape[1]
    if not path.exists():
        centroids = train_ivf_centroids(db, nlist, seed)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, centroids, allow_pickle=False)
        return centroids
    try:
        c = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: unreadable IVF centroids ({e}); delete it to retrain") from e
    if c.shape != (nlist, D) or c.dtype != np.float32:
        raise CorruptFileError(
            f"{path}: IVF centroids have shape {c.shape} {c.dtype}, "
            f"expected ({nlist}, {D}) float32; delete it to retrain"
        )
    return c


DatabaseBlocks = Callable[[int], Iterable[np.ndarray]]
"""A database streamed from a file: called with a block size, yields its rows (n, D) float32
block by block, in order (e.g. the embeddings of :func:`storage.features.iter_embeddings`)."""

STREAM_TILE_BYTES = 256 << 20  # (queries x database block) score tile of a streamed search


def build_topk_store(
    queries: np.ndarray,
    query_ids: np.ndarray,
    database: np.ndarray | DatabaseBlocks,
    database_ids: np.ndarray,
    out_dir: str | os.PathLike,
    k: int,
    *,
    shard_size: int = 10_000,
    block_size: int = 1024,
    db_block_size: int = 16384,
    exclude_self: bool = False,
    source_hashes: Mapping[str, str] | None = None,
    metric: str = "ip",
    search: TopkSearch | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimilarityStore:
    """Build (or resume) the top-k inner-product store of ``queries`` against ``database``.

    queries: (Nq, D) float32, database: (Nd, D) float32, both L2-normalised by the caller
    when cosine similarity is meant; query_ids: (Nq,), database_ids: (Nd,) int64.
    Queries are searched ``block_size`` at a time against the database in blocks of
    ``db_block_size`` rows (:func:`storage.topk.topk_search`), so the memory beyond the
    inputs is O(db_block_size * D + shard_size * K), never Nq x Nd. Shards already complete
    (file, row count and checksum match the manifest) are skipped; the manifest is
    rewritten after each shard. source_hashes: recorded in the manifest; by default hashes
    of the input arrays. search: exact (default) or approximate
    (``TopkSearch(method="ivf")``: a faiss IVF index over the database, which holds one
    more copy of it, O(Nd * D); its centroids are kept in the store as ``ivf-centroids.npy``
    so that a resumed build uses the same index). progress(done, total) is called after
    each shard.

    database may also be a :data:`DatabaseBlocks` (a table read block by block,
    ``database_ids`` its ids in row order; source_hashes then required): the exact search
    reads it once per block of queries (blocks of up to ``STREAM_TILE_BYTES`` of scores,
    e.g. 4,096 queries against 16,384 rows), so the database is never held whole; memory
    O(query block * db_block_size + Nq * k). An IVF search holds it whole in its index
    anyway, so it is read into memory first.
    """
    search = search or TopkSearch()
    if metric != "ip":
        raise ValueError(f"metric must be 'ip' (inner product), got {metric!r}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    qids = np.asarray(query_ids).astype(np.int64)
    dbids = np.asarray(database_ids).astype(np.int64)
    if callable(database) and search.method == "ivf":  # the index holds every row anyway
        database = np.concatenate([np.asarray(b, np.float32) for b in database(db_block_size)], axis=0)
    if callable(database):
        if source_hashes is None:
            raise ValueError(f"{out_dir}: a streamed database needs source_hashes (the files' hashes)")
        db = np.zeros((0, q.shape[-1]), np.float32)  # shape checks only; rows come from the stream
        Nd = len(dbids)
        blocks = database
        block_size = max(block_size, STREAM_TILE_BYTES // (4 * db_block_size))
    else:
        db = np.ascontiguousarray(database, dtype=np.float32)
        Nd = db.shape[0]

        def blocks(size: int) -> Iterable[np.ndarray]:
            return row_blocks(db, size)

    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"queries {q.shape} and database {db.shape} must be (Nq, D) and (Nd, D) with the same D")
    Nq, D = q.shape
    if qids.shape != (Nq,) or dbids.shape != (Nd,):
        raise ValueError(f"query_ids {qids.shape} / database_ids {dbids.shape} must be ({Nq},) / ({Nd},)")
    limit = Nd - 1 if exclude_self else Nd
    if not 1 <= k <= limit:
        raise ValueError(
            f"{out_dir}: k={k} but the database has {Nd} items"
            f"{' (one is excluded as self)' if exclude_self else ''}; need 1 <= k <= {limit}"
        )
    if not (np.isfinite(q).all() and np.isfinite(db).all()):
        raise DataValueError(f"{out_dir}: queries or database contain NaN or inf")
    hashes = (
        dict(source_hashes)
        if source_hashes is not None
        else {"queries": _array_hash(q, qids), "database": _array_hash(db, dbids)}
    )
    n_db = int(dbids.max()) + 1 if Nd and dbids.min() >= 0 else None
    n_shards = math.ceil(Nq / shard_size)
    store = create_store(out_dir, k, Nq, n_shards, shard_size, hashes, n_db=n_db, search=search.manifest_entry(Nd))
    pending = store.pending_shards()
    if not pending:
        return store
    ivf = None
    if search.method == "ivf":
        centroids = _ivf_centroids(store.path / IVF_CENTROIDS, db, search.n_lists(Nd), search.seed)
        ivf = ivf_index(centroids, row_blocks(db, 100_000), search.nprobe)
    for n_done, i in enumerate(pending, start=n_shards - len(pending) + 1):
        first, n_rows = store.shard_rows(i)
        nids = np.empty((n_rows, k), dtype=np.int64)
        scores = np.empty((n_rows, k), dtype=np.float32)
        for a in range(0, n_rows, block_size):
            rows = slice(first + a, first + min(n_rows, a + block_size))
            nids[a : a + block_size], scores[a : a + block_size] = topk_search(
                q[rows],
                blocks(db_block_size),
                k,
                database_ids=dbids,
                query_ids=qids[rows],
                exclude_self=exclude_self,
                ivf=ivf,
            )
        info = store.write_shard(i, qids[first : first + n_rows], nids, scores)
        store.mark_complete(i, info)
        if progress is not None:
            progress(n_done, n_shards)
    return store


def build_topk_store_from_tables(
    queries: str | os.PathLike,
    database: str | os.PathLike,
    out_dir: str | os.PathLike,
    k: int,
    *,
    query_split: str | None = None,
    database_split: str | None = None,
    normalise: bool = True,
    exclude_self: bool = False,
    shard_size: int = 50_000,
    search: TopkSearch | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimilarityStore:
    """Build (or resume) the top-k store of two features tables (the same file may serve as
    both, with or without splits). The database must have the queries' D; ``normalise``
    scores cosine similarity (rows L2-normalised), else raw inner products. The manifest
    records the files' hashes, splits and normalisation, so a store is resumed only from
    the same inputs."""
    q = read_features(queries, split=query_split)
    same_file = Path(database).resolve() == Path(queries).resolve()
    self_search = same_file and database_split == query_split

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if normalise else x

    q_hash = features_hash(queries)
    hashes = {
        "queries": q_hash,
        "database": q_hash if same_file else features_hash(database),
        "splits": f"{query_split}/{database_split}",
        "normalised": str(normalise),
    }
    xq = unit(q.embeddings)
    xdb: np.ndarray | DatabaseBlocks = xq
    db_ids = q.ids
    if not self_search:
        # the database is streamed from its table, block by block (never read whole)
        db_dim = int(read_metadata(database)["dim"])
        if db_dim != q.dim:
            raise SchemaError(f"{Path(database).name}: embedding has dim {db_dim}, expected {q.dim} (the queries')")
        db_ids = read_ids(database, split=database_split)

        def xdb(block_rows: int) -> Iterator[np.ndarray]:
            for _, emb in iter_embeddings(database, block_rows, database_split, q.dim, normalise):
                yield emb

    return build_topk_store(
        xq,
        q.ids,
        xdb,
        db_ids,
        Path(out_dir),
        k,
        shard_size=shard_size,
        exclude_self=exclude_self,
        source_hashes=hashes,
        search=search,
        progress=progress,
    )
