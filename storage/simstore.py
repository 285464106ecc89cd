"""Top-k similarity store: a directory of Parquet shards plus ``manifest.json``.

Shard rows: ``query_id`` int64, ``neighbor_ids`` list<int64> (length K, best first),
``scores`` list<float32> (length K). The manifest records K, the number of queries, the
shard count and size, the hashes of the source features, the database id bound and, per
shard, ``{file, first_row, n_rows, complete, sha256}``. Shard i holds query rows
``[i * shard_size, min((i + 1) * shard_size, n_queries))``.

Writers: ``write_shard`` may run in parallel processes (it only writes its own part
file); ``mark_complete`` rewrites the manifest and belongs to one driver process.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import atomic_path, atomic_write_text
from storage.errors import CorruptFileError, DataValueError, ManifestError, SchemaError
from storage.hashing import file_sha256

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT = "ssr-topk-store"
VERSION = 1
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


def _shard_table(query_ids: np.ndarray, neighbor_ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    n, k = neighbor_ids.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.table({
        "query_id": pa.array(query_ids, type=pa.int64()),
        "neighbor_ids": pa.ListArray.from_arrays(offsets, pa.array(neighbor_ids.reshape(-1), type=pa.int64())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), type=pa.float32())),
    })


class SimilarityStore:
    """An opened similarity store; the manifest is validated on open.

    n_db: if given (else the manifest's ``n_db``), neighbour ids must lie in [0, n_db).
    """

    def __init__(self, path: str | os.PathLike, *, n_db: int | None = None) -> None:
        self.path = Path(path)
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
        for key, typ in (("k", int), ("n_queries", int), ("n_shards", int), ("shard_size", int),
                         ("source_hashes", dict), ("shards", list)):
            if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
                raise self._err(f"field '{key}' missing or not {typ.__name__}")
        if m["k"] < 1 or m["shard_size"] < 1 or m["n_queries"] < 0:
            raise self._err("k and shard_size must be >= 1, n_queries >= 0")
        if m["n_shards"] != math.ceil(m["n_queries"] / m["shard_size"]):
            raise self._err(f"n_shards {m['n_shards']} does not match n_queries {m['n_queries']} "
                            f"/ shard_size {m['shard_size']}")
        if len(m["shards"]) != m["n_shards"]:
            raise self._err(f"lists {len(m['shards'])} shards, but n_shards is {m['n_shards']}")
        for i, info in enumerate(m["shards"]):
            first, n_rows = i * m["shard_size"], min(m["shard_size"], m["n_queries"] - i * m["shard_size"])
            if not isinstance(info, dict) or info.get("file") != shard_file(i):
                raise self._err(f"shard {i}: expected file '{shard_file(i)}', got {info!r}")
            if info.get("first_row") != first or info.get("n_rows") != n_rows:
                raise self._err(f"shard {i} ({shard_file(i)}): first_row/n_rows {info.get('first_row')}/"
                                f"{info.get('n_rows')}, expected {first}/{n_rows}")
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
    def write_shard(self, i: int, query_ids: np.ndarray, neighbor_ids: np.ndarray,
                    scores: np.ndarray) -> dict[str, Any]:
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
            pq.write_table(_shard_table(qids, nids, sc), tmp)
        return {"file": name, "first_row": first, "n_rows": n_rows, "complete": True,
                "sha256": file_sha256(self.path / name)}

    def mark_complete(self, i: int, info: Mapping[str, Any]) -> None:
        """Record shard i as complete (driver only; atomic manifest rewrite)."""
        first, n_rows = self.shard_rows(i)
        if info.get("file") != shard_file(i) or info.get("n_rows") != n_rows or info.get("first_row") != first:
            raise self._err(f"shard {i}: entry {dict(info)} does not describe {shard_file(i)} "
                            f"(first_row {first}, n_rows {n_rows})")
        if not (self.path / shard_file(i)).is_file():
            raise self._err(f"shard {i}: {shard_file(i)} does not exist; write it before marking it complete")
        self.manifest["shards"][i] = {**dict(info), "complete": True}
        self._write_manifest()

    def mark_incomplete(self, i: int) -> None:
        self.manifest["shards"][self._check_index(i)]["complete"] = False
        self._write_manifest()

    # ---- reading --------------------------------------------------------------------
    def _check_values(self, name: str, qids: np.ndarray, nids: np.ndarray, sc: np.ndarray) -> None:
        if self.n_db is not None and nids.size:
            bad = (nids < 0) | (nids >= self.n_db)
            if bad.any():
                r = int(np.argmax(bad.any(axis=1)))
                raise DataValueError(f"{name}: neighbor_ids of query_id {int(qids[r])} has id "
                                     f"{int(nids[r][bad[r]][0])} outside [0, {self.n_db})")
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
                raise SchemaError(f"{path}: columns {names}, expected {list(COLUMNS)} "
                                  f"(missing {missing}, extra {extra})")
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
            if not (pa.types.is_list(c.type) or pa.types.is_large_list(c.type)) or c.type.value_type != vtype:
                raise SchemaError(f"{path}: {col} has type {c.type}, expected list<{vtype}>")
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
                raise ManifestError(f"{self.path / info['file']}: marked complete in the manifest but "
                                    "missing, truncated or changed (row count or sha256 differ)")


def create_store(out_dir: str | os.PathLike, k: int, n_queries: int, n_shards: int, shard_size: int,
                 source_hashes: Mapping[str, str] | None = None, *, n_db: int | None = None,
                 search: Mapping[str, Any] | None = None) -> SimilarityStore:
    """Create an empty store (manifest with every shard incomplete), or reopen an existing
    one with the same parameters for resume. A different existing store is an error.

    search: how the neighbours were found (``TopkSearch.manifest_entry``); recorded in the
    manifest and, when given, must match on resume."""
    out = Path(out_dir)
    hashes = {str(a): str(b) for a, b in (source_hashes or {}).items()}
    if k < 1 or shard_size < 1 or n_queries < 0:
        raise ValueError(f"{out}: k and shard_size must be >= 1 and n_queries >= 0 "
                         f"(got {k}, {shard_size}, {n_queries})")
    if n_shards != math.ceil(n_queries / shard_size):
        raise ValueError(f"{out}: n_shards {n_shards} does not match "
                         f"ceil(n_queries {n_queries} / shard_size {shard_size})")
    if (out / MANIFEST).exists():
        store = SimilarityStore(out)
        want = {"k": k, "n_queries": n_queries, "n_shards": n_shards, "shard_size": shard_size,
                "source_hashes": hashes, "n_db": n_db}
        if search is not None:
            want["search"] = dict(search)
            store.manifest.setdefault("search", {"method": "exact"})  # stores from before the option
        for key, value in want.items():
            if store.manifest.get(key) != value:
                raise ManifestError(f"{out / MANIFEST}: existing store has {key}={store.manifest.get(key)!r}, "
                                    f"requested {value!r}; use a new directory or delete this one")
        return store
    out.mkdir(parents=True, exist_ok=True)
    strays = sorted(p.name for p in out.glob("part-*.parquet"))
    if strays:
        raise ManifestError(f"{out / MANIFEST}: manifest missing but {strays[0]} exists; refusing to mix stores")
    manifest = {"format": FORMAT, "version": VERSION, "k": k, "n_queries": n_queries, "n_shards": n_shards,
                "shard_size": shard_size, "source_hashes": hashes, "n_db": n_db,
                **({"search": dict(search)} if search is not None else {}),
                "shards": [{"file": shard_file(i), "first_row": i * shard_size,
                            "n_rows": min(shard_size, n_queries - i * shard_size), "complete": False}
                           for i in range(n_shards)]}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return SimilarityStore(out)


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _topk_block(q: torch.Tensor, db: torch.Tensor, k: int,
                db_block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of q @ db.T, scanning db in tiles of db_block_size rows and merging.

    q: (B, D); db: (Nd, D). Returns scores (B, k) and row indices into db (B, k), best first.
    Peak extra memory: one (B, db_block_size) score tile.
    """
    import torch

    best_v = best_i = None
    for c in range(0, db.shape[0], db_block_size):
        tile = q @ db[c:c + db_block_size].T  # (B, tile)
        v, i = torch.topk(tile, min(k, tile.shape[1]), dim=1)
        i += c
        if best_v is None:
            best_v, best_i = v, i
        else:
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            best_v, j = torch.topk(v, min(k, v.shape[1]), dim=1)
            best_i = torch.gather(i, 1, j)
    return best_v, best_i


def topk_inner_product(queries: np.ndarray, database: np.ndarray, k: int, database_ids: np.ndarray,
                       query_ids: np.ndarray | None = None, exclude_self: bool = False,
                       block_size: int = 1024, db_block_size: int = 16384,
                       index: "_IvfIndex | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database items by inner product for a set of queries, block by block.

    queries: (B, D) float32; database: (Nd, D) float32 (used in place, no copy);
    database_ids: (Nd,) int64; query_ids: (B,) int64, needed with exclude_self, which drops
    the database item whose id equals the query id. Returns neighbor_ids (B, k) int64 and
    scores (B, k) float32, best first. Extra memory: one (block_size, db_block_size)
    float32 score tile plus O(block_size * k), whatever B and Nd are. index: an approximate
    index built over ``database`` to search instead of scoring every item.
    """
    import torch

    B = queries.shape[0]
    kk = k + 1 if exclude_self else k
    db = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32))
    out_ids = np.empty((B, k), dtype=np.int64)
    out_scores = np.empty((B, k), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, B, block_size):
            b = min(B, a + block_size)
            if index is not None:
                scores, rows = index.search(np.ascontiguousarray(queries[a:b], dtype=np.float32), kk)
            else:
                q = torch.from_numpy(np.ascontiguousarray(queries[a:b], dtype=np.float32))
                v, i = _topk_block(q, db, kk, db_block_size)
                scores, rows = v.numpy(), i.numpy()
            ids = database_ids[rows]
            if exclude_self:
                is_self = ids == query_ids[a:b, None]
                # drop the self match when present, else the last (k+1-th) neighbour
                drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), kk - 1)
                keep = np.ones_like(is_self)
                keep[np.arange(b - a), drop] = False
                ids = ids[keep].reshape(b - a, k)
                scores = scores[keep].reshape(b - a, k)
            out_ids[a:b] = ids
            out_scores[a:b] = scores
    return out_ids, out_scores


SEARCH_METHODS = ("exact", "ivf")
IVF_CENTROIDS = "ivf-centroids.npy"


@dataclass(frozen=True)
class TopkSearch:
    """How ``build_topk_store`` finds each query's top k; recorded in the manifest.

    ``exact``: every database item is scored (torch matmul + topk on tiles); the reference.
    ``ivf``: approximate, a faiss IVF-Flat inner-product index (spherical k-means coarse
    quantiser with ``nlist`` lists, ``nprobe`` lists scanned per query). Its cost per query
    is about ``nprobe / nlist`` of the exact search, for a recall below 1 that depends on
    the data; measure it (``benchmarks/bench_scale.py topk --recall``) before relying on it.
    The trained centroids are kept next to the shards, so a resumed build uses the same
    index. nlist 0 means about 4 * sqrt(Nd); seed fixes the training sample and k-means.
    """

    method: str = "exact"
    nlist: int = 0
    nprobe: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {self.method!r}")
        if self.nlist < 0 or self.nprobe < 1:
            raise ValueError(f"ivf search needs nlist >= 0 (0: automatic) and nprobe >= 1, "
                             f"got nlist={self.nlist}, nprobe={self.nprobe}")

    def n_lists(self, n_db: int) -> int:
        """Inverted lists for a database of n_db items (at least 39 training points each)."""
        want = self.nlist or int(round(4 * math.sqrt(n_db)))
        return max(1, min(want, n_db // 39))

    def manifest_entry(self, n_db: int) -> dict[str, Any]:
        if self.method == "exact":
            return {"method": "exact"}
        return {"method": "ivf", "nlist": self.n_lists(n_db), "nprobe": self.nprobe, "seed": self.seed}


class _IvfIndex:
    """A faiss IVF-Flat inner-product index over ``db``; centroids cached in ``centroids_path``."""

    def __init__(self, db: np.ndarray, spec: TopkSearch, centroids_path: Path) -> None:
        import faiss

        Nd, D = db.shape
        nlist = spec.n_lists(Nd)
        self.quantizer = faiss.IndexFlatIP(D)
        centroids = self._load_centroids(centroids_path, nlist, D)
        if centroids is None:
            sample_size = min(Nd, 64 * nlist)
            rows = np.sort(np.random.default_rng(spec.seed).choice(Nd, sample_size, replace=False))
            clus = faiss.Clustering(D, nlist)
            clus.seed, clus.spherical, clus.max_points_per_centroid = spec.seed, True, 64
            clus.train(np.ascontiguousarray(db[rows]), self.quantizer)
            centroids = faiss.vector_to_array(clus.centroids).reshape(nlist, D).astype(np.float32)
            with atomic_path(centroids_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, centroids, allow_pickle=False)
            self.quantizer.reset()
        self.quantizer.add(centroids)
        self.index = faiss.IndexIVFFlat(self.quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.is_trained = True
        for a in range(0, Nd, 100_000):  # IVF-Flat keeps its own copy of the vectors
            self.index.add(np.ascontiguousarray(db[a:a + 100_000]))
        self.index.nprobe = min(spec.nprobe, nlist)
        self.db = db

    @staticmethod
    def _load_centroids(path: Path, nlist: int, D: int) -> np.ndarray | None:
        if not path.exists():
            return None
        try:
            c = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"{path}: unreadable IVF centroids ({e}); delete it to retrain") from e
        if c.shape != (nlist, D) or c.dtype != np.float32:
            raise CorruptFileError(f"{path}: IVF centroids have shape {c.shape} {c.dtype}, "
                                   f"expected ({nlist}, {D}) float32; delete it to retrain")
        return c

    def search(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and row indices (B, kk), best first. Rows whose probed lists hold fewer
        than kk items (faiss pads them with -1) are answered by the exact search."""
        import torch

        scores, rows = self.index.search(np.ascontiguousarray(q), kk)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if short.size:
            with torch.inference_mode():
                v, i = _topk_block(torch.from_numpy(np.ascontiguousarray(q[short])), torch.from_numpy(self.db), kk, 16384)
            scores[short], rows[short] = v.numpy(), i.numpy()
        return scores, rows


def build_topk_store(queries: np.ndarray, query_ids: np.ndarray, database: np.ndarray, database_ids: np.ndarray,
                     out_dir: str | os.PathLike, k: int, *, shard_size: int = 10_000, block_size: int = 1024,
                     db_block_size: int = 16384, exclude_self: bool = False,
                     source_hashes: Mapping[str, str] | None = None, metric: str = "ip",
                     search: TopkSearch | None = None,
                     progress: Callable[[int, int], None] | None = None) -> SimilarityStore:
    """Build (or resume) the top-k inner-product store of ``queries`` against ``database``.

    queries: (Nq, D) float32, database: (Nd, D) float32, both L2-normalised by the caller
    when cosine similarity is meant; query_ids: (Nq,), database_ids: (Nd,) int64.
    Scores are computed with torch matmul + topk on (block_size, db_block_size) tiles
    (64 MiB by default) merged into a running top-k, so the memory beyond the inputs is
    O(block_size * db_block_size + shard_size * K), never Nq x Nd (CPU tensors; the
    pipeline decides where this runs). Shards already complete (file, row count and
    checksum match the manifest) are skipped; the manifest is rewritten after each shard.
    source_hashes: recorded in the manifest; by default hashes of the input arrays.
    search: exact (default) or approximate (``TopkSearch(method="ivf")``: a faiss IVF index
    over the database, which holds one more copy of it, O(Nd * D)). progress(done, total)
    is called after each shard.
    """
    search = search or TopkSearch()
    if metric != "ip":
        raise ValueError(f"metric must be 'ip' (inner product), got {metric!r}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    db = np.ascontiguousarray(database, dtype=np.float32)
    qids = np.asarray(query_ids).astype(np.int64)
    dbids = np.asarray(database_ids).astype(np.int64)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"queries {q.shape} and database {db.shape} must be (Nq, D) and (Nd, D) with the same D")
    Nq, D = q.shape
    Nd = db.shape[0]
    if qids.shape != (Nq,) or dbids.shape != (Nd,):
        raise ValueError(f"query_ids {qids.shape} / database_ids {dbids.shape} must be ({Nq},) / ({Nd},)")
    limit = Nd - 1 if exclude_self else Nd
    if not 1 <= k <= limit:
        raise ValueError(f"{out_dir}: k={k} but the database has {Nd} items"
                         f"{' (one is excluded as self)' if exclude_self else ''}; need 1 <= k <= {limit}")
    if not (np.isfinite(q).all() and np.isfinite(db).all()):
        raise DataValueError(f"{out_dir}: queries or database contain NaN or inf")
    hashes = dict(source_hashes) if source_hashes is not None else {
        "queries": _array_hash(q, qids), "database": _array_hash(db, dbids)}
    n_db = int(dbids.max()) + 1 if Nd and dbids.min() >= 0 else None
    n_shards = math.ceil(Nq / shard_size)
    store = create_store(out_dir, k, Nq, n_shards, shard_size, hashes, n_db=n_db, search=search.manifest_entry(Nd))
    pending = store.pending_shards()
    if not pending:
        return store
    index = _IvfIndex(db, search, store.path / IVF_CENTROIDS) if search.method == "ivf" else None
    for n_done, i in enumerate(pending, start=n_shards - len(pending) + 1):
        first, n_rows = store.shard_rows(i)
        rows = slice(first, first + n_rows)
        nids, scores = topk_inner_product(q[rows], db, k, dbids, qids[rows], exclude_self, block_size, db_block_size,
                                          index=index)
        info = store.write_shard(i, qids[rows], nids, scores)
        store.mark_complete(i, info)
        if progress is not None:
            progress(n_done, n_shards)
    return store
