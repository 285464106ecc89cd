"""The real retrieval data of the paper as features tables: revisited Oxford / Paris (test)
and SfM-120k (training, with a held-out validation part).

``data_root`` is the folder ``ssr data download ssr-landmark-features`` fills:
``gl18_resnet101_{roxford5k,rparis6k,sfm120k}.pkl``, the authors' pickles (read with the
restricted unpickler; features stored (D, N)):

- test sets: ``database`` (D, N), ``query`` (D, Q), ``gt``: Q dicts ``easy``/``hard``/
  ``junk`` (database indices) and ``bbx``;
- SfM-120k: ``database`` (D, N) and ``cluster`` (N,) landmark cluster ids.

Each pickle is imported once into a cache folder named after the pickle and its size and
modification time; the folder is built under a temporary name and renamed when complete,
so a failed import leaves nothing behind and a later run reuses a finished one.

Validation never touches the test sets: a deterministic fraction of the SfM-120k clusters
(:func:`holdout_clusters`, a seeded hash of the cluster id) is held out of training. Its
images form a revisited-format validation set (:func:`validation_ground_truth`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from storage.errors import DataValueError, SchemaError, StorageError
from storage.features import read_metadata, write_features
from storage.hashing import file_sha256
from storage.landmarks import RevisitedGroundTruth, import_landmarks, read_landmark_pickle

TEST_SETS = ("roxford5k", "rparis6k")
TRAIN_SET = "sfm120k"
BACKBONE = "gl18_resnet101"
TRAIN_TABLE = "train.parquet"  # split "train" / "val" (held-out clusters), label = cluster id


@dataclass(frozen=True)
class LandmarkTestSet:
    """Features tables of a revisited test set: ``database`` (ids 0..N-1 in the ground
    truth's order), ``query`` (ids 0..Q-1) and ``gnd`` (our JSON ground truth)."""

    database: Path
    query: Path
    gnd: Path
    dim: int


@dataclass(frozen=True)
class LandmarkTrainSet:
    """SfM-120k features table (label = cluster id; split ``train`` or ``val`` for the
    held-out clusters) and the hold-out that split it."""

    table: Path
    dim: int
    n_train: int
    n_val: int
    holdout_fraction: float
    holdout_seed: int


def landmark_pickle(data_root: str | os.PathLike, dataset: str) -> Path:
    """Path of ``<data_root>/gl18_resnet101_<dataset>.pkl``; a clear error when it is missing."""
    path = Path(data_root) / f"{BACKBONE}_{dataset}.pkl"
    if not path.is_file():
        raise StorageError(
            f"{path}: not found; data_root must hold the authors' landmark pickles "
            f"({BACKBONE}_{{roxford5k,rparis6k,sfm120k}}.pkl, `ssr data download ssr-landmark-features`)"
        )
    return path


def _cache_dir(cache_root: Path, source: Path, extra: str = "") -> Path:
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{extra}".encode()).hexdigest()[:12]
    return cache_root / f"{source.stem}-{key}"


def build_once(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` into a temporary sibling folder and rename it to ``final``; an
    existing ``final`` is reused as it is (it only ever appears complete)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process finished the same import first
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def import_test_set(data_root: str | os.PathLike, dataset: str, cache_root: str | os.PathLike) -> LandmarkTestSet:
    """Features tables and ground truth of ``roxford5k`` / ``rparis6k`` (imported once)."""
    if dataset not in TEST_SETS:
        raise ValueError(f"dataset: expected one of {list(TEST_SETS)}, got {dataset!r}")
    source = landmark_pickle(data_root, dataset)

    def build(tmp: Path) -> None:
        written = import_landmarks(source, tmp)
        if "query" not in written:
            raise SchemaError(f"{source}: no 'query' features; a test pickle holds 'database', 'query' and 'gt'")
        if "gnd" not in written:
            raise SchemaError(
                f"{source}: no ground truth; expected key 'gt' with one dict per query (fields easy, hard, junk, bbx)"
            )

    out = build_once(_cache_dir(Path(cache_root), source), build)
    db, q, gnd = out / "database.parquet", out / "query.parquet", out / "gnd.json"
    return LandmarkTestSet(db, q, gnd, int(read_metadata(db)["dim"]))


def holdout_clusters(clusters: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: True for the items whose cluster is held out.

    A cluster is held out when the first 8 bytes of BLAKE2b("<seed>:<cluster id as text>"), read as
    an unsigned integer over 2**64, are below ``fraction``: the same clusters on every
    machine and run, independent of the order and number of items.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction: expected a value in (0, 1), got {fraction}")
    clusters = np.asarray(clusters)
    uniq, inverse = np.unique(clusters, return_inverse=True)
    u = (
        np.array(
            [int.from_bytes(hashlib.blake2b(f"{seed}:{c}".encode(), digest_size=8).digest(), "big") for c in uniq],
            dtype=np.float64,
        )
        / 2.0**64
    )
    return (u < fraction)[inverse.reshape(-1)]


def import_train_set(
    data_root: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    holdout_fraction: float = 0.05,
    holdout_seed: int = 0,
    expected_dim: int | None = None,
) -> LandmarkTrainSet:
    """SfM-120k as one features table (imported once per hold-out): label = cluster id,
    split ``val`` for the held-out clusters and ``train`` for the rest.

    ``expected_dim`` is the test set's D; training features of another width are refused.
    """
    source = landmark_pickle(data_root, TRAIN_SET)

    def _check_dim(dim: int) -> None:
        if expected_dim is not None and dim != expected_dim:
            raise DataValueError(
                f"{source}: database has D={dim}, but the test features have D={expected_dim}; "
                "training and test features must come from the same backbone"
            )

    def build(tmp: Path) -> None:
        feats = read_landmark_pickle(source)
        if feats.cluster is None:
            raise SchemaError(
                f"{source}: missing key 'cluster'; the SfM-120k training pickle needs 'database' (D, N) "
                "and 'cluster' (N,) cluster ids"
            )
        _check_dim(feats.database.shape[1])
        held = holdout_clusters(feats.cluster, holdout_fraction, holdout_seed)
        if held.all() or not held.any():
            n = len(np.unique(feats.cluster))
            raise DataValueError(
                f"{source}: cluster: holding out {holdout_fraction:g} of {n} clusters leaves "
                f"{'no training' if held.all() else 'no validation'} cluster; expected more clusters"
            )
        N = len(feats.cluster)
        meta = {
            "dataset": TRAIN_SET,
            "backbone": BACKBONE,
            "checkpoint_hash": file_sha256(source),
            "source": source.name,
            "holdout_fraction": str(holdout_fraction),
            "holdout_seed": str(holdout_seed),
        }
        write_features(
            tmp / TRAIN_TABLE,
            ids=np.arange(N),
            labels=feats.cluster,
            splits=np.where(held, "val", "train"),
            embeddings=feats.database,
            metadata=meta,
        )

    out = build_once(_cache_dir(Path(cache_root), source, f"{holdout_fraction}|{holdout_seed}"), build)
    table = out / TRAIN_TABLE
    meta = read_metadata(table)
    dim = int(meta["dim"])
    _check_dim(dim)  # a table imported earlier for another test set
    splits = pq.read_table(table, columns=["split"]).column("split").to_numpy(zero_copy_only=False)
    n_val = int((splits == "val").sum())
    return LandmarkTrainSet(table, dim, len(splits) - n_val, n_val, holdout_fraction, holdout_seed)


def validation_ground_truth(
    clusters: np.ndarray,
    n_queries: int,
    seed: int,
    spread: bool = False,
    grade: Callable[[int, np.ndarray], Sequence[str | None]] | None = None,
) -> tuple[np.ndarray, np.ndarray, RevisitedGroundTruth]:
    """A revisited-format validation set over held-out items with cluster labels (M,).

    Up to ``n_queries`` queries are drawn (seeded) so that each query's cluster keeps at
    least one other item; the database is every item that is not a query, as in a real
    test set. spread: every cluster gives one query before any gives a second (so queries
    keep as many positives as the clusters allow, as a test set's do); otherwise items are
    taken in a random order. Per query: ``easy`` = the database items of its cluster,
    ``hard`` and ``junk`` = none; with ``grade``, ``grade(query row, rows of its cluster's
    database items)`` labels each of those items ``"easy"``, ``"hard"``, ``"junk"`` or None (not
    listed), as a test set's rule would (``validation.glyph_grader``); the draw is the same.
    Returns (query rows (Q,), database rows (M - Q,), ground
    truth whose indices are positions in the database rows).
    """
    clusters = np.asarray(clusters)
    uniq, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if not (counts > 1).any():
        raise DataValueError(
            f"validation clusters: none of the {len(uniq)} held-out clusters has two images; "
            "expected clusters with positives"
        )
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(uniq), np.int64)
    picked: list[int] = []
    order = rng.permutation(len(clusters))
    if spread:  # an item's round is how many items of its cluster came before it in the random order
        seen = np.zeros(len(uniq), np.int64)
        rounds = np.empty(len(order), np.int64)
        for pos, i in enumerate(order):
            rounds[pos] = seen[inverse[i]]
            seen[inverse[i]] += 1
        order = order[np.argsort(rounds, kind="stable")]
    for i in order:
        if len(picked) == n_queries:
            break
        c = inverse[i]
        if taken[c] < counts[c] - 1:
            taken[c] += 1
            picked.append(i)
    queries = np.sort(np.asarray(picked, np.int64))
    is_query = np.zeros(len(clusters), bool)
    is_query[queries] = True
    database = np.flatnonzero(~is_query)
    db_clusters = clusters[database]
    gnd = []
    for q in queries:
        same = np.flatnonzero(db_clusters == clusters[q]).astype(np.int64)
        entry: dict = {"easy": same, "hard": np.zeros(0, np.int64), "junk": np.zeros(0, np.int64), "bbx": None}
        if grade is not None:
            labels = list(grade(int(q), database[same]))
            if len(labels) != len(same) or not set(labels) <= {"easy", "hard", "junk", None}:
                raise DataValueError(
                    f"validation grade: {len(labels)} labels {sorted(set(map(str, labels)))} for {len(same)} items; "
                    "expected one of easy, hard, junk or None per item"
                )
            lab = np.asarray(labels, dtype=object)
            entry.update({key: same[lab == key] for key in ("easy", "hard", "junk")})
        gnd.append(entry)
    gt = RevisitedGroundTruth([str(int(i)) for i in database], [str(int(q)) for q in queries], gnd)
    return queries, database, gt
