"""Ray side of the retrieval track: the Tune trainable of retrieval SSR training, and the
candidate search pool of the re-rankers (``CandidateSearchPool``).

The re-ranking actor pool is in ``ssr_tasks.retrieval.rerank`` next to its plain worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.handoffs import TrialTracking
from ssr_tasks.ray_grid import Trial, run_grid
from ssr_tasks.retrieval.evaluate import CandidateSearcher
from ssr_tasks.retrieval.handoffs import RetrievalTrial
from ssr_tasks.retrieval.train import load_training_data, train_retrieval
from ssr_tasks.services import init_ray


@dataclass(frozen=True)
class RetrievalTrialInputs:
    """What a retrieval trial reads: the training table (splits 'train' and 'val')."""

    features: str


def retrieval_trial(trial: Trial[RetrievalTrainParams]) -> tuple[dict, dict]:
    """The trainable of the retrieval grid: SSR trained on retrieval sequences for one sweep point.

    It trains in the trial's workspace: every validation is reported with the loop's files
    as a Tune checkpoint, and a restarted or restored trial resumes from the latest one."""
    cfg = trial.config
    emb, labels, val = load_training_data(Path(trial.inputs.features), cfg)
    summary = train_retrieval(
        cfg,
        emb,
        labels,
        val,
        trial.workspace.path,
        device=trial.device,
        report=lambda row: trial.workspace.report({**row, "progress": row["iteration"] / cfg.iterations}),
    )
    summary = {**summary, "n_train_images": len(emb), "n_val_queries": len(val.queries)}
    return summary, {"best_val_map": summary["best_val"]}


def run_trials(
    base: RetrievalTrainParams,
    sweep: Mapping[str, Sequence],
    features: Path,
    feat_dim: int,
    ckpt_root: Path,
    storage_path: Path,
    device: str = "cpu",
    max_failures: int = 2,
    progress: Callable[[float], None] | None = None,
    tracking: TrialTracking | None = None,
) -> list[RetrievalTrial]:
    """One trial per point of ``sweep`` in parallel (``ssr_tasks.ray_grid.run_grid``) on the
    training table ``features`` (splits 'train' and 'val'); their results, in the sweep's order."""
    done = run_grid(
        retrieval_trial,
        base,
        sweep,
        name="retrieval-ssr",
        inputs=RetrievalTrialInputs(str(features)),
        ckpt_root=ckpt_root,
        storage_path=storage_path,
        device=device,
        max_failures=max_failures,
        progress=progress,
        tracking=tracking,
    )
    return [RetrievalTrial.from_summary(r.config, r.label, feat_dim, r.summary) for r in done]


class CandidateSearchPool:
    """A ``NeighbourSearch`` (``ssr_model.baselines.neighbours``) run on a pool of Ray actors:
    the rows to search are cut into blocks of ``rows_per_task`` and each block is one task
    on a ``CandidateSearcher`` actor, so a cluster shortens the candidate searches of the
    re-rankers (k-reciprocal, alpha-DBA, diffusion) and DQE's negatives. Results come back
    in row order. database: an (N, D) array (L2-normalised and put once in the object
    store) or a features table path (each actor streams it, normalised). Use as a context
    manager, or call ``close``. Wiring: ``with CandidateSearchPool(db) as pool:
    method_rankings(q, db, choice, search=pool)`` (and ``choose_baselines(..., search=pool)``
    with a pool over the validation database).
    """

    def __init__(
        self,
        database: Any,
        n_actors: int = 0,
        *,
        split: str | None = "database",
        rows_per_task: int = 1024,
        db_block: int = 16384,
    ):
        import ray  # lazy: Ray is heavy and only needed where a pool runs
        from ray.util import ActorPool  # lazy: Ray, as above

        from ssr_tasks.services import pool_size

        self.rows_per_task = rows_per_task
        # the pool keeps the database's object reference, so that a restarted actor finds it
        source: Any
        if isinstance(database, (str, Path)):
            source = database
        else:  # L2-normalised, as the re-rankers' database (a table is normalised as it is read)
            db = np.asarray(database, dtype=np.float32)
            norms = np.linalg.norm(db, axis=1, keepdims=True)
            if not np.allclose(norms, 1.0, atol=1e-5):  # rows already unit length are kept bit for bit
                db = db / np.maximum(norms, 1e-12)
            source = ray.put(np.ascontiguousarray(db))
        self.database_ref = source
        Actor = ray.remote(CandidateSearcher).options(num_cpus=1, max_restarts=2, max_task_retries=2)
        self.actors = [
            Actor.remote(str(source) if isinstance(source, Path) else source, split, db_block, 1)
            for _ in range(pool_size(n_actors, use_gpu=False))
        ]
        self.pool = ActorPool(self.actors)

    def _map(self, method: str, feats: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        feats = np.asarray(feats, dtype=np.float32)
        blocks = [feats[a : a + self.rows_per_task] for a in range(0, len(feats), self.rows_per_task)]
        if not blocks:
            blocks = [feats[:0]]
        parts = list(self.pool.map(lambda a, b: getattr(a, method).remote(b, k), blocks))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))

    def top(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, sims = self._map("top", feats, k)
        return ids, sims

    def lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, sims = self._map("lowest", feats, k)
        return ids, sims

    def top_with_lowest(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, sims, low = self._map("top_with_lowest", feats, k)
        return ids, sims, low

    def close(self) -> None:
        import ray  # lazy: Ray, as above

        for a in self.actors:
            ray.kill(a)  # type: ignore[arg-type]  # Ray stub: ray.remote(cls).options(...).remote() is an ActorHandle
        self.actors = []

    def __enter__(self) -> CandidateSearchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def candidate_search(database: Any, n_actors: int) -> Iterator[CandidateSearchPool | None]:
    """The search the re-rankers use for their candidates: a ``CandidateSearchPool`` of
    ``n_actors`` (0: one per free CPU) or, with -1, a pool only on a Ray cluster of more than
    one node (on one machine the search stays in the caller's process, whose cores the
    pipeline's other actors share; on the idle 2-core machine 2 actors searched 1.79x as fast
    as 1, docs/benchmarks.md, so 0 is worth setting on a machine with free cores); None means
    the in-process search."""
    import ray  # lazy: Ray, as above

    if n_actors == -1:
        n_actors = 0 if ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1 else -1
    if n_actors < 0:
        yield None
        return
    init_ray()
    with CandidateSearchPool(database, n_actors) as pool:
        yield pool
