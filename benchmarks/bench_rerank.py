"""Re-ranking throughput of the Ray actor pool over Parquet shards (queries/s), 1 vs 2 actors.

Synthetic L2-normalised features; the top-K store is built first (not timed), then
``ssr_tasks.retrieval.rerank.rerank_store`` re-ranks every shard with a pool of N actors, each
loading the database features and the model once. Prints a Markdown table.

    python benchmarks/bench_rerank.py --queries 100000 --k 100 --actors 1 2

The driver's peak RSS is printed. The model's hidden width defaults to 128 to keep CPU runs short; the paper's
1024 costs ~8x more per query (see bench_ssr_model.py for the model alone).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--database", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=100, help="neighbours stored and re-ranked")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=5_000)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray
    import torch

    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.retrieval.handoffs import RetrievalModel
    from ssr_tasks.retrieval.rerank import rerank_store
    from ssr_tasks.services import init_ray
    from storage.features import write_features
    from storage.simstore import SimilarityStore, build_topk_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rerank-"))
    rng = np.random.default_rng(0)
    db = rng.standard_normal((args.database, args.dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    meta = {"dataset": "synthetic", "backbone": "none", "checkpoint_hash": "-", "dim": str(args.dim)}
    write_features(
        work / "db.parquet",
        ids=np.arange(args.database),
        labels=["db"] * args.database,
        splits=["database"] * args.database,
        embeddings=db,
        metadata=meta,
    )
    write_features(
        work / "q.parquet",
        ids=np.arange(args.queries),
        labels=["q"] * args.queries,
        splits=["query"] * args.queries,
        embeddings=q,
        metadata=meta,
    )
    t0 = time.perf_counter()
    build_topk_store(
        q, np.arange(args.queries), db, np.arange(args.database), work / "topk", args.k, shard_size=args.shard_size
    )
    build_s = time.perf_counter() - t0
    del q
    torch.manual_seed(0)
    cfg = RetrievalTrainParams(k=args.k, steps=1, lr_dni=1e-4, hidden=args.hidden)
    torch.save(cfg.build(args.dim).state_dict(), work / "model.pt")
    model = RetrievalModel(str(work / "model.pt"), cfg, args.dim)

    init_ray()

    rows = []
    for n in args.actors:
        out = work / f"reranked-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rerank_store(work / "topk", work / "q.parquet", work / "db.parquet", out, model, n_actors=n)
        secs = time.perf_counter() - t0
        assert SimilarityStore(out).is_complete()
        rows.append((n, secs, args.queries / secs))
    print(
        f"\nqueries={args.queries:,} database={args.database:,} D={args.dim} K={args.k} hidden={args.hidden} "
        f"shard_size={args.shard_size:,}; top-K store built in {build_s:.1f} s (not in the table)"
    )
    print(f"CPUs: {ray.cluster_resources().get('CPU')}, driver peak RSS {rss_mb():.0f} MB\n")
    print("| actors | wall (s) | queries/s | speed-up |")
    print("|---|---|---|---|")
    for n, secs, qps in rows:
        print(f"| {n} | {secs:.1f} | {qps:,.0f} | {qps / rows[0][2]:.2f}x |")
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
