"""Revisited Oxford/Paris ground truth and the SSR authors' landmark feature pickles.

Pickles are read with the restricted unpickler. Our own ground-truth format is JSON:
``{"imlist": [...], "qimlist": [...], "gnd": [{"easy": [...], "hard": [...],
"junk": [...], "bbx": [x1, y1, x2, y2] | null}, ...]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.atomic import atomic_write_text
from storage.errors import CorruptFileError, DataValueError, SchemaError
from storage.features import write_features
from storage.hashing import file_sha256
from storage.safe_pickle import safe_load, str_keys

GND_LISTS = ("easy", "hard", "junk")

# Key names accepted in a landmark pickle (first match wins).
DATABASE_KEYS = ("X", "db", "database", "feat", "feats", "features", "vecs")
QUERY_KEYS = ("Q", "query", "queries", "qvecs")
GT_KEYS = ("gnd", "gt")
CLUSTER_KEYS = ("cluster", "clusters", "labels", "label")


@dataclass
class RevisitedGroundTruth:
    """imlist: N database image names; qimlist: Q query names; gnd: Q dicts with
    ``easy``/``hard``/``junk`` (int64 arrays of database indices) and ``bbx``
    (4 floats or None)."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "imlist": list(self.imlist),
            "qimlist": list(self.qimlist),
            "gnd": [
                {
                    **{key: [int(v) for v in g[key]] for key in GND_LISTS},
                    "bbx": None if g["bbx"] is None else [float(v) for v in g["bbx"]],
                }
                for g in self.gnd
            ],
        }


def _validate_gnd(obj: Any, source: str, n_db: int | None = None) -> RevisitedGroundTruth:
    if not isinstance(obj, dict):
        raise SchemaError(f"{source}: expected a dict with keys imlist, qimlist, gnd; got {type(obj).__name__}")
    obj = str_keys(obj)
    for key in ("imlist", "qimlist", "gnd"):
        if key not in obj:
            raise SchemaError(f"{source}: missing key '{key}' (expected imlist, qimlist, gnd)")
    imlist = [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in obj["imlist"]]
    qimlist = [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in obj["qimlist"]]
    n = len(imlist) if n_db is None else n_db
    raw = obj["gnd"]
    if not isinstance(raw, (list, tuple)) or len(raw) != len(qimlist):
        got = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise SchemaError(f"{source}: gnd has {got} entries, expected one per query ({len(qimlist)})")
    gnd = []
    for qi, g in enumerate(raw):
        g = str_keys(g)
        if not isinstance(g, dict):
            raise SchemaError(f"{source}: query {qi}: gnd entry is {type(g).__name__}, expected a dict")
        out: dict[str, Any] = {}
        for key in GND_LISTS:
            if key not in g:
                raise SchemaError(f"{source}: query {qi}: missing field '{key}'")
            try:
                arr = np.asarray(g[key], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"{source}: query {qi}: field '{key}' is not a list of ints ({exc})") from exc
            bad = (arr < 0) | (arr >= n)
            if bad.any():
                raise DataValueError(
                    f"{source}: query {qi}: field '{key}' has index {int(arr[bad][0])} outside [0, {n}) (database size)"
                )
            out[key] = arr
        bbx = g.get("bbx")
        if bbx is not None:
            bbx_arr = np.asarray(bbx, dtype=np.float64).reshape(-1)
            if bbx_arr.shape != (4,) or not np.isfinite(bbx_arr).all():
                raise SchemaError(f"{source}: query {qi}: field 'bbx' must be 4 finite numbers, got {bbx!r}")
            bbx = [float(v) for v in bbx_arr]
        out["bbx"] = bbx
        gnd.append(out)
    return RevisitedGroundTruth(imlist, qimlist, gnd)


def read_revisited_gnd(path: str | os.PathLike) -> RevisitedGroundTruth:
    """Read a revisitop ``gnd_<dataset>.pkl`` (restricted unpickler) and validate it."""
    return _validate_gnd(safe_load(path), os.fspath(path))


def read_gnd_json(path: str | os.PathLike) -> RevisitedGroundTruth:
    """Read our ``gnd.json`` ground truth and validate it."""
    return _validate_gnd(_read_json(Path(path)), os.fspath(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from exc


def read_gnd(path: str | os.PathLike, n_db: int | None = None) -> RevisitedGroundTruth:
    """Ground truth in either published format: our ``gnd.json`` (``.json``) or a revisitop
    pickle (anything else). With ``n_db`` (the database's rows) every index must be below it
    and a non-empty ``imlist`` must have that length."""
    path = Path(path)
    obj = _read_json(path) if path.suffix.lower() == ".json" else safe_load(path)
    gt = _validate_gnd(obj, os.fspath(path), n_db=n_db)
    if n_db is not None and gt.imlist and len(gt.imlist) != n_db:
        raise DataValueError(f"{path}: imlist has {len(gt.imlist)} images, but the database has {n_db} rows")
    return gt


def write_gnd_json(path: str | os.PathLike, gt: RevisitedGroundTruth) -> Path:
    return atomic_write_text(path, json.dumps(gt.to_json()))


@dataclass
class LandmarkFeatures:
    """database: (N, D) float32 row-major; query: (Q, D) float32 or None; gt: ground
    truth (RevisitedGroundTruth, or the raw array/list when not in gnd format) or None;
    cluster: (N,) int64 cluster labels (SfM-120k) or None."""

    database: np.ndarray
    query: np.ndarray | None
    gt: Any
    cluster: np.ndarray | None


def _pick(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in obj:
            return key, obj[key]
    return None, None


def _as_matrix(value: Any, source: str, key: str | None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise SchemaError(f"{source}: '{key}' must be a 2-D numeric array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def read_landmark_pickle(path: str | os.PathLike) -> LandmarkFeatures:
    """Read the authors' landmark feature pickle (a dict; keys in DATABASE_KEYS,
    QUERY_KEYS, GT_KEYS, CLUSTER_KEYS).

    The authors store features column-wise, (D, N); they are transposed to (N, D). The
    orientation is checked against the queries (same D) or the cluster labels (length N)
    when present; without either the authors' (D, N) layout is assumed.
    """
    source = os.fspath(path)
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise SchemaError(f"{source}: expected a dict of features, got {type(obj).__name__}")
    obj = str_keys(obj)
    db_key, db = _pick(obj, DATABASE_KEYS)
    if db_key is None:
        raise SchemaError(
            f"{source}: no database features; expected one of the keys {list(DATABASE_KEYS)}, "
            f"found {sorted(map(str, obj))}"
        )
    db = _as_matrix(db, source, db_key)
    q_key, q = _pick(obj, QUERY_KEYS)
    q = None if q is None else _as_matrix(q, source, q_key)
    c_key, cluster = _pick(obj, CLUSTER_KEYS)
    if cluster is not None:
        cluster = np.asarray(cluster).reshape(-1)
        if cluster.dtype.kind not in "iu":
            raise SchemaError(f"{source}: '{c_key}' must be integer cluster labels, got dtype {cluster.dtype}")
        cluster = cluster.astype(np.int64)
    # orientation: authors' (D, N) unless the evidence says (N, D)
    transpose = True
    if q is not None:
        if db.shape[0] == q.shape[0]:
            transpose = True
        elif db.shape[1] == q.shape[1]:
            transpose = False
        else:
            raise DataValueError(
                f"{source}: '{q_key}' is {q.shape} and '{db_key}' is {db.shape}: query and database "
                "features must have the same D (the authors' layout is (D, Q) and (D, N))"
            )
    elif cluster is not None:
        if len(cluster) == db.shape[1]:
            transpose = True
        elif len(cluster) == db.shape[0]:
            transpose = False
        else:
            raise SchemaError(f"{source}: '{c_key}' has {len(cluster)} labels, but '{db_key}' is {db.shape}")
    database = np.ascontiguousarray(db.T if transpose else db, dtype=np.float32)
    query = None if q is None else np.ascontiguousarray(q.T if transpose else q, dtype=np.float32)
    N = database.shape[0]
    if cluster is not None and len(cluster) != N:
        raise SchemaError(f"{source}: '{c_key}' has {len(cluster)} labels, expected {N} (database rows)")
    for key, arr in ((db_key, database), (q_key, query)):
        if arr is not None and not np.isfinite(arr).all():
            row = int(np.argmin(np.isfinite(arr).all(axis=1)))
            raise DataValueError(f"{source}: '{key}' row {row} has NaN or inf values")
    gt_key, gt = _pick(obj, GT_KEYS)
    if isinstance(gt, dict) and "gnd" in str_keys(gt):
        gt = _validate_gnd(gt, f"{source}['{gt_key}']", n_db=N)
    elif isinstance(gt, (list, tuple)) and gt and isinstance(gt[0], dict):
        qn = [str(i) for i in range(len(gt))]
        gt = _validate_gnd(
            {"imlist": [str(i) for i in range(N)], "qimlist": qn, "gnd": list(gt)}, f"{source}['{gt_key}']", n_db=N
        )
    return LandmarkFeatures(database, query, gt, cluster)


def import_landmarks(
    pickle_path: str | os.PathLike, out_dir: str | os.PathLike, gnd_path: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Convert an authors' landmark pickle into features tables (+ ``gnd.json``).

    Writes ``<out_dir>/database.parquet`` (ids 0..N-1, label = cluster id or -1, split
    ``database``), ``query.parquet`` when the pickle has queries (split ``query``), and
    ``gnd.json`` from ``gnd_path`` (a revisitop pickle) or the pickle's own ground truth.
    Returns the written paths by name.
    """
    pickle_path, out = Path(pickle_path), Path(out_dir)
    feats = read_landmark_pickle(pickle_path)
    stem = pickle_path.stem.rstrip("_")
    backbone, _, dataset = stem.rpartition("_")
    gt = (
        read_revisited_gnd(gnd_path)
        if gnd_path is not None
        else (feats.gt if isinstance(feats.gt, RevisitedGroundTruth) else None)
    )
    N = feats.database.shape[0]
    if gt is not None:
        if len(gt.imlist) != N and gnd_path is not None:
            raise DataValueError(
                f"{gnd_path}: imlist has {len(gt.imlist)} images, but {pickle_path} has {N} database features"
            )
        if feats.query is not None and len(gt.qimlist) != feats.query.shape[0]:
            raise DataValueError(
                f"{gnd_path or pickle_path}: qimlist has {len(gt.qimlist)} queries, but "
                f"{pickle_path} has {feats.query.shape[0]} query features"
            )
    meta = {
        "dataset": dataset or stem,
        "backbone": backbone or "unknown",
        "checkpoint_hash": file_sha256(pickle_path),
        "source": pickle_path.name,
    }
    written: dict[str, Path] = {}
    labels = feats.cluster if feats.cluster is not None else np.full(N, -1, dtype=np.int64)
    paths = gt.imlist if gt is not None and len(gt.imlist) == N else None
    written["database"] = write_features(
        out / "database.parquet",
        ids=np.arange(N),
        labels=labels,
        splits="database",
        embeddings=feats.database,
        paths=paths,
        metadata=meta,
    )
    if feats.query is not None:
        Q = feats.query.shape[0]
        qpaths = gt.qimlist if gt is not None else None
        written["query"] = write_features(
            out / "query.parquet",
            ids=np.arange(Q),
            labels=np.full(Q, -1),
            splits="query",
            embeddings=feats.query,
            paths=qpaths,
            metadata=meta,
        )
    if gt is not None:
        written["gnd"] = write_gnd_json(out / "gnd.json", gt)
    return written
