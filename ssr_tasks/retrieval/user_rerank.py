"""``ssr rerank``: re-rank anyone's embeddings with a registered retrieval model.

QUERIES and DATABASE are features tables (``storage.features``; the ``ssr data topk``
inputs). The top-K store of the queries against the database is built, or reused when it
is already complete for the same files, under ``<out>/topk``; a pool of Ray actors, each
loading the registered model once, re-ranks it shard by shard into ``<out>/reranked``
(same schema). K must be the model's k. With a revisitop ground truth (JSON or pickle;
query i = row i of QUERIES, database index j = row j of DATABASE) the revisited mAP
(Easy / Medium / Hard) of the top-K lists before and after is returned; positives outside
the top-K count as not retrieved.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ssr_model.metrics import revisited_map
from ssr_tasks.device import cluster_device
from ssr_tasks.retrieval.handoffs import RegisteredRetrievalModel
from ssr_tasks.retrieval.rerank import rerank_store
from ssr_tasks.services import init_ray, mlflow_tracking_uri
from ssr_tasks.tracking import load_registered_model
from storage.features import read_ids, read_metadata
from storage.landmarks import read_gnd
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
    return out


def _maps(ranks: np.ndarray, gnd: list[dict]) -> dict[str, float]:
    res = revisited_map(ranks, gnd)
    return {p: round(res[p]["map"], 2) for p in ("easy", "medium", "hard")}


def rerank_features(queries: Path, database: Path, model_uri: str, out: Path, k: int | None = None,
                    gnd: Path | None = None, n_actors: int = 0, device: str = "auto", shard_size: int = 50_000,
                    progress: Callable[[int, int], None] | None = None) -> RerankOutput:
    """Build or reuse the top-K store, re-rank it with the registered model on Ray actors,
    and score both with ``gnd`` when given. Bad input raises ValueError naming the file."""
    queries, database, out = Path(queries), Path(database), Path(out)
    q_dim, db_dim = int(read_metadata(queries)["dim"]), int(read_metadata(database)["dim"])
    if q_dim != db_dim:
        raise ValueError(f"{database}: embedding has dim {db_dim}, but {queries.name} has dim {q_dim}")
    model = registered_retrieval_model(model_uri)
    k = model.k if k is None else k
    if k != model.k:
        raise ValueError(f"--k {k}: the model {model_uri} re-ranks exactly k={model.k} neighbours; use --k {model.k}")
    if q_dim != model.feat_dim:
        raise ValueError(f"{queries}: embedding has dim {q_dim}, the model {model_uri} expects {model.feat_dim}")
    gt = None
    if gnd is not None:
        q_ids, db_ids = read_ids(queries), read_ids(database)
        gt = read_gnd(gnd, n_db=len(db_ids))
        if len(gt.gnd) != len(q_ids):
            raise ValueError(f"{gnd}: gnd has {len(gt.gnd)} queries, but {queries.name} has {len(q_ids)} rows")
    store = build_topk_store_from_tables(queries, database, out / "topk", k, shard_size=shard_size)
    init_ray()
    reranked = rerank_store(store.path, queries, database, out / "reranked", model, n_actors=n_actors,
                            device=cluster_device(device), progress=progress, db_split=None)
    result = RerankOutput(store.path, reranked, k, store.n_queries)
    if gt is None:
        return result
    before = _maps(_store_ranks(store.path, q_ids, db_ids), gt.gnd)
    after = _maps(_store_ranks(reranked, q_ids, db_ids), gt.gnd)
    return RerankOutput(store.path, reranked, k, store.n_queries, before, after)
