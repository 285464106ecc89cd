"""Re-ranking similarity stores with SSR: a plain per-shard worker and the Ray actor pool.

``ShardReranker`` loads the database features and the model once, then re-ranks whole
shards: the first ``k`` neighbours of each query are re-ordered by SSR's refined
similarity (their scores become the refined ones); neighbours beyond ``k`` keep their order
and scores. Each output shard is written atomically by the worker; only the driver
touches the manifest, marking a shard complete after its worker returned. A worker killed
mid-shard leaves no file under the final name; Ray restarts the actor and retries the
shard, and a rerun redoes only pending shards, so every query ends up exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr_tasks.retrieval.handoffs import RegisteredRetrievalModel, RetrievalModel
from ssr_tasks.services import pool_size
from storage.features import lookup_embeddings, read_features
from storage.simstore import SimilarityStore, create_store

log = logging.getLogger(__name__)


class ShardReranker:
    """Plain class behind the Ray actor: the database features (any unique int ids; the
    stores hold those ids) and the model, each loaded once.

    db_features: a features table (rows of ``db_split``, read into memory and normalised) or
    the pipeline's ``database.npy`` (unit rows, id = row number; memory-mapped, so actors on
    a node share its pages and each batch reads only its neighbours' rows).

    model: a ``RetrievalModel`` (trained weights) or a ``RegisteredRetrievalModel`` (a
    registry URI); anything with ``build()``, ``k`` and ``feat_dim``.
    """

    def __init__(
        self,
        db_features: str,
        model: RetrievalModel | RegisteredRetrievalModel,
        device: str = "cpu",
        threads: int | None = None,
        db_split: str | None = "database",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.db_path = db_features
        self.db: np.ndarray | torch.Tensor
        if str(db_features).endswith(".npy"):  # the pipeline's database: unit rows, id = row, memory-mapped
            self.db = np.load(db_features, mmap_mode="r")
            if self.db.ndim != 2 or self.db.shape[1] != model.feat_dim:
                raise ValueError(f"{db_features}: database of shape {self.db.shape}, expected (N, {model.feat_dim})")
            self.db_sorted_ids = np.arange(len(self.db), dtype=np.int64)
            self.db_order = self.db_sorted_ids
        else:
            table = read_features(Path(db_features), split=db_split, expected_dim=model.feat_dim)
            self.db_order = np.argsort(table.ids, kind="stable")
            self.db_sorted_ids = table.ids[self.db_order]
            emb = np.array(table.embeddings, dtype=np.float32)  # one writable copy, normalised in place
            del table
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            self.db = torch.from_numpy(emb)
        self.model = model.build().to(self.device)
        self.k = model.k
        self.dim = model.feat_dim

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Database rows of the ids (n, K); an id absent from the database table is an error."""
        pos = np.minimum(np.searchsorted(self.db_sorted_ids, ids), len(self.db_sorted_ids) - 1)
        missing = self.db_sorted_ids[pos] != ids
        if missing.any():
            raise ValueError(
                f"{self.db_path}: neighbour id {int(ids[missing][0])} of the store is not in the database table"
            )
        return self.db_order[pos]

    def _shard_queries(self, path: str, query_ids: np.ndarray, shard: int) -> torch.Tensor:
        """L2-normalised features (n, D) of ``query_ids``, looked up in the query table.

        Only the row groups holding the shard's id range are read, so each shard costs its
        own rows, whatever the number of queries in the table.
        """
        emb, found = lookup_embeddings(Path(path), query_ids, expected_dim=self.dim)
        if not found.all():
            raise ValueError(
                f"{path}: query id {int(np.asarray(query_ids)[~found][0])} of shard {shard} has no features"
            )
        return F.normalize(torch.from_numpy(emb), dim=-1, eps=1e-12)

    @torch.no_grad()
    def rerank_arrays(self, query: torch.Tensor, neighbor_ids: np.ndarray, scores: np.ndarray, batch: int = 512):
        """query (n, D), neighbor_ids / scores (n, K) -> re-ranked (ids, scores), same shapes."""
        k = min(self.k, neighbor_ids.shape[1])
        ids_out, sc_out = neighbor_ids.copy(), scores.astype(np.float32).copy()
        for s in range(0, len(query), batch):
            ids = torch.from_numpy(np.array(neighbor_ids[s : s + batch, :k], dtype=np.int64))
            rows = self._rows(ids.numpy())
            if isinstance(self.db, np.ndarray):  # gathered from the memory map: only these rows are read
                nb = torch.from_numpy(np.asarray(self.db[rows.ravel()])).view(*rows.shape, -1).to(self.device)
            else:
                nb = self.db[torch.from_numpy(rows)].to(self.device)
            refined = self.model(query[s : s + batch].to(self.device), nb).float().cpu()
            order = refined.argsort(dim=-1, descending=True, stable=True)
            ids_out[s : s + batch, :k] = ids.gather(1, order).numpy()
            sc_out[s : s + batch, :k] = refined.gather(1, order).numpy()
        return ids_out, sc_out

    def rerank_shard(self, store_dir: str, query_features: str, out_dir: str, shard: int) -> tuple[int, dict]:
        """Re-rank shard ``shard`` of ``store_dir`` into the same shard of ``out_dir``; returns (shard, write info)."""
        part = SimilarityStore(Path(store_dir)).read_shard(shard)
        qemb = self._shard_queries(query_features, part.query_ids, shard)
        ids, scores = self.rerank_arrays(qemb, part.neighbor_ids, part.scores)
        info = SimilarityStore(Path(out_dir)).write_shard(shard, part.query_ids, ids, scores)
        return shard, info


def rerank_store(
    store_dir: Path,
    query_features: Path,
    db_features: Path,
    out_dir: Path,
    model: RetrievalModel | RegisteredRetrievalModel,
    n_actors: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    max_restarts: int = 3,
    db_split: str | None = "database",
) -> Path:
    """Re-rank every pending shard of ``store_dir`` into ``out_dir`` with a pool of Ray actors
    (one GPU each when ``device`` is "cuda"); each actor loads the database rows of
    ``db_split`` (all rows when None) and the model once."""
    import ray  # lazy: Ray is heavy and only needed where a pool runs
    from ray.util import ActorPool  # lazy: Ray, as above

    src = SimilarityStore(Path(store_dir))
    out = create_store(
        Path(out_dir),
        src.k,
        src.n_queries,
        src.n_shards,
        src.shard_size,
        {**src.source_hashes, "reranked_by": model.name},
    )
    pending = out.pending_shards()
    if not pending:
        return Path(out_dir)
    use_gpu = device == "cuda"
    n = min(pool_size(n_actors, use_gpu), len(pending))
    Actor = ray.remote(ShardReranker).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=max_restarts, max_task_retries=max_restarts
    )
    actors = [Actor.remote(str(db_features), model, device, 1, db_split) for _ in range(n)]
    pool = ActorPool(actors)
    done = 0
    for shard, info in pool.map_unordered(
        lambda a, i: a.rerank_shard.remote(str(store_dir), str(query_features), str(out_dir), i), pending
    ):
        out.mark_complete(shard, info)
        done += 1
        if progress is not None:
            progress(done, len(pending))
    for a in actors:
        ray.kill(a)  # type: ignore[arg-type]  # Ray stub: ray.remote(cls).options(...).remote() is an ActorHandle
    log.info("re-ranking: %d shard(s) of %s done with %d actor(s)", len(pending), Path(store_dir).name, n)
    return Path(out_dir)
