"""``ssr rerank``: re-rank anyone's embeddings with a registered retrieval model.

QUERIES and DATABASE are features tables (``storage.features``; the ``ssr data topk``
inputs), or plain tables written by pandas, Polars or pyarrow with ``id`` and ``embedding``
(a list or fixed-size list of floats) and, for ``--gnd labels``, ``label``: those are
copied once into canonical tables under ``<out>/inputs``. The top-K store of the queries against the database is built, or reused when it
is already complete for the same files, under ``<out>/topk``; a pool of Ray actors, each
loading the registered model once, re-ranks it shard by shard into ``<out>/reranked``
(same schema). K must be the model's k. With a revisitop ground truth (JSON or pickle;
query i = row i of QUERIES, database index j = row j of DATABASE) the revisited mAP
(Easy / Medium / Hard) of the top-K lists before and after is returned; with ``labels``
instead of a file, a database item is positive when its label equals the query's (one mAP
and mP@10). Positives outside the top-K count as not retrieved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssr_model.metrics import revisited_map
from ssr_tasks.config import Device
from ssr_tasks.device import cluster_device
from ssr_tasks.registry import load_registered_model
from ssr_tasks.retrieval.handoffs import RegisteredRetrievalModel
from ssr_tasks.retrieval.rerank import rerank_store
from ssr_tasks.services import init_ray, mlflow_tracking_uri
from storage.features import (
    embedding_array,
    embedding_type_dim,
    features_hash,
    first_row_dim,
    read_features,
    read_ids,
    read_metadata,
    write_features,
)
from storage.landmarks import RevisitedGroundTruth, read_gnd
from storage.own_data import label_ground_truth
from storage.simstore import SimilarityStore, build_topk_store_from_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankOutput:
    """The initial and re-ranked stores; mAP (percent) before and after by protocol when a
    ground truth was given."""

    topk: Path
    reranked: Path
    k: int
    n_queries: int
    map_before: dict[str, float] | None = None
    map_after: dict[str, float] | None = None


def registered_retrieval_model(uri: str, tracking_uri: str | None = None) -> RegisteredRetrievalModel:
    """The registered model's description (k, D), read once from the registry."""
    tracking_uri = tracking_uri or mlflow_tracking_uri()
    ssr = load_registered_model(uri, tracking_uri).ssr
    return RegisteredRetrievalModel(uri, tracking_uri, int(ssr.k), int(ssr.feat_dim))


def _store_ranks(store: Path, query_ids: np.ndarray, db_ids: np.ndarray) -> np.ndarray:
    """(Q, K) database row positions of the store's lists, in the query table's row order."""
    q_row = {int(i): r for r, i in enumerate(query_ids)}
    order = np.argsort(db_ids)
    out = None
    for shard in SimilarityStore(store).iter_shards():
        if out is None:
            out = np.empty((len(query_ids), shard.neighbor_ids.shape[1]), np.int64)
        rows = np.asarray([q_row[int(i)] for i in shard.query_ids])
        out[rows] = order[np.searchsorted(db_ids[order], shard.neighbor_ids)]
    if out is None:
        raise ValueError(f"{store}: the similarity store holds no shards")
    return out


def _maps(ranks: np.ndarray, gnd: list[dict]) -> dict[str, float]:
    res = revisited_map(ranks, gnd)
    return {
        **{p: round(res[p]["map"], 2) for p in ("easy", "medium", "hard")},
        **{f"mP@10 {p}": round(res[p]["mp"][10], 2) for p in ("medium", "hard")},
    }


def _canonical(table: Path, out_dir: Path, split: str) -> Path:
    """``table`` itself when it is a features table, else its canonical copy under ``out_dir``
    (named after its content), made once: id, label (-1 without one), embedding
    fixed_size_list<float32>[D]. Bad rows are refused by ``write_features`` naming the file."""
    try:
        schema = pq.read_schema(table)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{table}: not a readable Parquet file ({exc})") from None
    index = schema.get_field_index("embedding")
    if (
        index >= 0
        and pa.types.is_fixed_size_list(schema.field(index).type)
        and "split" in schema.names
        and b"dim" in (schema.metadata or {})
    ):
        return table
    out = out_dir / f"{table.stem}-{features_hash(table)[:10]}.parquet"
    if not out.exists():
        missing = [c for c in ("id", "embedding") if c not in schema.names]
        if missing:
            raise ValueError(
                f"{table}: missing column(s) {missing} (expected id, embedding and optionally label, path)"
            )
        data = pq.read_table(table)
        ids = np.asarray(data.column("id").to_numpy(), dtype=np.int64)
        column = data.column("embedding")
        dim = embedding_type_dim(column.type, str(table)) or first_row_dim(column, ids, str(table))
        embeddings = embedding_array(column, ids, dim, str(table))
        labels = data.column("label").to_pylist() if "label" in schema.names else np.full(len(ids), -1)
        paths = data.column("path").to_pylist() if "path" in schema.names else None
        write_features(
            out,
            ids=ids,
            labels=labels,
            splits=[split] * len(ids),
            embeddings=embeddings,
            paths=paths,
            metadata={
                "dataset": table.stem,
                "backbone": "none",
                "checkpoint_hash": "none",
                "dim": str(dim),
                "source": str(table.resolve()),
            },
        )
    return out


def _label_gnd(queries: Path, database: Path) -> RevisitedGroundTruth:
    """Ground truth from the tables' labels (``--gnd labels``)."""
    q, db = read_features(queries), read_features(database)
    if not len(q.labels) or (np.asarray(q.labels).astype(str) == "-1").all():
        raise ValueError(f"{queries}: label: --gnd labels needs a label column in the queries and database tables")
    return label_ground_truth(np.asarray(q.labels), np.asarray(db.labels), source=f"{queries.name} / {database.name}")


def rerank_features(
    queries: Path,
    database: Path,
    model_uri: str,
    out: Path,
    k: int | None = None,
    gnd: Path | str | None = None,
    n_actors: int = 0,
    device: Device = "auto",
    shard_size: int = 50_000,
    progress: Callable[[int, int], None] | None = None,
) -> RerankOutput:
    """Build or reuse the top-K store, re-rank it with the registered model on Ray actors,
    and score both with ``gnd`` when given (a file, or "labels"). Bad input raises
    ValueError naming the file."""
    out = Path(out)
    queries = _canonical(Path(queries), out / "inputs", "query")
    database = _canonical(Path(database), out / "inputs", "database")
    q_dim, db_dim = int(read_metadata(queries)["dim"]), int(read_metadata(database)["dim"])
    if q_dim != db_dim:
        raise ValueError(f"{database}: embedding has dim {db_dim}, but {queries.name} has dim {q_dim}")
    model = registered_retrieval_model(model_uri)
    k = model.k if k is None else k
    if k != model.k:
        raise ValueError(f"--k {k}: the model {model_uri} re-ranks exactly k={model.k} neighbours; use --k {model.k}")
    if q_dim != model.feat_dim:
        raise ValueError(
            f"{queries.name}: embedding has dim {q_dim}, but the model {model_uri} was trained on dim {model.feat_dim}"
        )
    gt = None
    if gnd is not None:
        q_ids, db_ids = read_ids(queries), read_ids(database)
        gt = _label_gnd(queries, database) if str(gnd) == "labels" else read_gnd(Path(gnd), n_db=len(db_ids))
        if len(gt.gnd) != len(q_ids):
            raise ValueError(f"{gnd}: gnd has {len(gt.gnd)} queries, but {queries.name} has {len(q_ids)} rows")
    store = build_topk_store_from_tables(queries, database, out / "topk", k, shard_size=shard_size)
    init_ray()
    reranked = rerank_store(
        store.path,
        queries,
        database,
        out / "reranked",
        model,
        n_actors=n_actors,
        device=cluster_device(device),
        progress=progress,
        db_split=None,
    )
    result = RerankOutput(store.path, reranked, k, store.n_queries)
    if gt is None:
        return result
    before = _maps(_store_ranks(store.path, q_ids, db_ids), gt.gnd)
    after = _maps(_store_ranks(reranked, q_ids, db_ids), gt.gnd)
    return RerankOutput(store.path, reranked, k, store.n_queries, before, after)
