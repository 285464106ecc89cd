"""Scale: actor-pool re-ranking of up to 1,000,000 queries, and the top-K store of 1M features.

Two measurements, each N in its own process so each peak memory is its own:

``rerank``: a top-K store (K=100) of N synthetic queries against a 20,000-item database
is written as Parquet shards (setup, not timed), then ``ssr_tasks.retrieval.rerank.rerank_store``
re-ranks every shard with a pool of Ray actors (small model: hidden 64, D 32, steps 1).
Reports queries/s, the driver's peak RSS during the re-ranking (``VmHWM``, reset before
it starts) and each actor's peak RSS (``VmHWM`` of the ``ray::ShardReranker`` processes
this driver started, sampled every 0.5 s).

``topk``: ``storage.simstore.build_topk_store`` for N x D=128 L2-normalised features
against a database of the first M of them (M = N: all against all, self excluded), K=100,
shards of 50,000, exact (``--search exact``) or with a faiss IVF index (``--search ivf``).
The features are ``--clusters`` Gaussian clusters (centre + ``--spread`` x noise per
dimension; 0 clusters: uniform on the sphere, where no index can beat a scan). Reports wall
time, peak RSS before and after the build and, with ``--recall R``, the recall@K of the
store against the exact top-K of R sampled queries.

    python benchmarks/bench_scale.py rerank --queries 100000 300000 1000000
    python benchmarks/bench_scale.py topk --queries 1000000 --database 100000
    python benchmarks/bench_scale.py topk --queries 1000000 --search ivf --recall 2000

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def status_kb(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(20):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        pid = int(fields[1])
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


class ActorMemory(threading.Thread):
    """Peak RSS (``VmHWM``) and RSS samples (``VmRSS``) of this driver's ``ray::<name>``
    worker processes, read from /proc every ``every`` seconds."""

    def __init__(self, name: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.name_tag, self.every, self.stop = f"ray::{name}", every, threading.Event()
        self.peaks: dict[int, int] = {}
        self.samples: dict[int, list[int]] = {}

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmd = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(self.name_tag.encode()) and _descends_from(int(d.name), me):
                    self.peaks[int(d.name)] = max(self.peaks.get(int(d.name), 0), status_kb(d.name, "VmHWM"))
                    self.samples.setdefault(int(d.name), []).append(status_kb(d.name, "VmRSS"))
            self.stop.wait(self.every)


def unit_vectors(rng, n: int, dim: int, chunk: int = 100_000, clusters: int = 0, spread: float = 1.0) -> np.ndarray:
    """n unit vectors: uniform on the sphere, or around ``clusters`` random centres."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) if clusters else None
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, clusters, len(x))] + spread * x
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# ---- rerank --------------------------------------------------------------------------------


def rerank_setup(work: Path, n: int, args) -> None:
    """Features, top-K store and model for n queries (cached in ``work``)."""
    import torch

    from ssr_model import RetrievalSSR
    from storage.features import write_features
    from storage.simstore import SimilarityStore, build_topk_store

    if (work / "topk" / "_manifest.json").exists() and SimilarityStore(work / "topk").is_complete():
        return
    rng = np.random.default_rng(0)
    db = unit_vectors(rng, args.database, args.dim)
    q = unit_vectors(rng, n, args.dim)
    meta = {"dataset": "synthetic", "backbone": "none", "checkpoint_hash": "-", "dim": str(args.dim)}
    write_features(
        work / "db.parquet",
        ids=np.arange(args.database),
        labels=np.zeros(args.database, np.int64),
        splits="database",
        embeddings=db,
        metadata=meta,
    )
    write_features(
        work / "q.parquet", ids=np.arange(n), labels=np.zeros(n, np.int64), splits="query", embeddings=q, metadata=meta
    )
    build_topk_store(q, np.arange(n), db, np.arange(args.database), work / "topk", args.k, shard_size=args.shard_size)
    torch.manual_seed(0)
    kwargs = {"feat_dim": args.dim, "k": args.k, "steps": 1, "lr_dni": 1e-4, "hidden": args.hidden}
    torch.save(RetrievalSSR(**kwargs).state_dict(), work / "model.pt")


def rerank_one(work: Path, n: int, args) -> dict:
    """Re-rank the store of ``work`` (this process is the driver); returns the measurements."""
    import ray

    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.retrieval.handoffs import RetrievalModel
    from ssr_tasks.retrieval.rerank import rerank_store
    from ssr_tasks.services import init_ray
    from storage.simstore import SimilarityStore

    cfg = RetrievalTrainParams(k=args.k, steps=1, lr_dni=1e-4, hidden=args.hidden)
    model = RetrievalModel(str(work / "model.pt"), cfg, args.dim)
    init_ray(num_cpus=args.cpus)
    out = work / "reranked"
    shutil.rmtree(out, ignore_errors=True)
    reset_peak()
    mem = ActorMemory("ShardReranker")
    mem.start()
    t0 = time.perf_counter()
    rerank_store(
        work / "topk",
        work / "q.parquet",
        work / "db.parquet",
        out,
        model,
        n_actors=args.actors,
        progress=lambda d, t: print(
            f"  {n:,} queries: shard {d}/{t} at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
        ),
    )
    secs = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    driver_peak = status_kb("self", "VmHWM")
    store = SimilarityStore(out)
    assert store.is_complete() and store.n_queries == n
    ray.shutdown()
    return {
        "queries": n,
        "secs": secs,
        "qps": n / secs,
        "driver_mb": driver_peak / 1024,
        "actor_mb": sorted(v / 1024 for v in mem.peaks.values()),
        "actor_median_mb": sorted(float(np.median(v)) / 1024 for v in mem.samples.values() if v),
        "actor_last_quarter_mb": sorted(max(v[-max(1, len(v) // 4) :]) / 1024 for v in mem.samples.values() if v),
        "actor_first_quarter_mb": sorted(max(v[: max(1, len(v) // 4)]) / 1024 for v in mem.samples.values() if v),
        "shards": store.n_shards,
    }


def cmd_rerank(args) -> None:
    rows = []
    for n in args.queries:
        work = Path(args.workdir) / f"rerank-{n}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "rerank-setup", str(work), str(n), *common(args)], check=True)
        setup_s = time.perf_counter() - t0
        res = subprocess.run(
            [sys.executable, __file__, "rerank-one", str(work), str(n), *common(args)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["setup_s"] = setup_s
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nre-ranking: database {args.database:,}, D={args.dim}, K={args.k}, hidden={args.hidden}, steps=1, "
        f"shards of {args.shard_size:,}, {args.actors} actor(s), Ray CPUs {args.cpus}\n"
    )
    print(
        "| queries | shards | wall (s) | queries/s | driver peak RSS (MiB) | actor peak RSS (MiB) "
        "| actor median RSS (MiB) | actor max RSS, first / last quarter of the run (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---|---|---|")
    mib = lambda xs: ", ".join(f"{m:.0f}" for m in xs)
    for r in rows:
        quarters = " / ".join(f"{a:.0f}" for a in (max(r["actor_first_quarter_mb"]), max(r["actor_last_quarter_mb"])))
        print(
            f"| {r['queries']:,} | {r['shards']} | {r['secs']:.0f} | {r['qps']:.0f} | {r['driver_mb']:.0f} "
            f"| {mib(r['actor_mb'])} | {mib(r['actor_median_mb'])} | {quarters} |"
        )


def common(args) -> list[str]:
    return [
        "--database",
        str(args.database),
        "--dim",
        str(args.dim),
        "--k",
        str(args.k),
        "--hidden",
        str(args.hidden),
        "--shard-size",
        str(args.shard_size),
        "--actors",
        str(args.actors),
        "--cpus",
        str(args.cpus),
    ]


# ---- topk ----------------------------------------------------------------------------------


def store_recall(store, x: np.ndarray, m: int, k: int, n_sample: int, seed: int = 1) -> tuple[float, float]:
    """Mean recall@k of ``store`` against the exact top-k of n_sample random queries, and
    the exact scan's queries/s on that sample (to project an exact build of the whole store)."""
    from storage.topk import row_blocks, topk_search

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.n_queries, min(n_sample, store.n_queries), replace=False))
    t0 = time.perf_counter()
    exact, _ = topk_search(x[rows], row_blocks(x[:m], 16384), k, query_ids=rows, exclude_self=(m == len(x)))
    qps = len(rows) / (time.perf_counter() - t0)
    hits = 0
    for i in range(store.n_shards):
        first, n_rows = store.shard_rows(i)
        mine = rows[(rows >= first) & (rows < first + n_rows)]
        if mine.size:
            got = store.read_shard(i).neighbor_ids[mine - first]
            want = exact[np.searchsorted(rows, mine)]
            hits += sum(len(np.intersect1d(g, w)) for g, w in zip(got, want))
    return hits / (len(rows) * k), qps


def cmd_topk(args) -> None:
    from storage.simstore import SimilarityStore, build_topk_store
    from storage.topk import TopkSearch

    search = TopkSearch(method=args.search, nlist=args.nlist, nprobe=args.nprobe)
    rows = []
    for n in args.queries:
        m = min(args.database or n, n)
        work = Path(args.workdir) / f"topk-{n}-{m}"
        shutil.rmtree(work, ignore_errors=True)
        rng = np.random.default_rng(0)
        x = unit_vectors(rng, n, args.dim, clusters=args.clusters, spread=args.spread)
        ids = np.arange(n)
        build_topk_store(
            x[:2000],
            ids[:2000],
            x[:5000],
            ids[:5000],
            work / "warmup",
            args.k,
            shard_size=1000,
            search=TopkSearch(args.search, nlist=8, nprobe=2),
        )  # libraries loaded
        before = status_kb("self", "VmHWM") / 1024
        t0 = time.perf_counter()
        build_topk_store(
            x,
            ids,
            x[:m],
            ids[:m],
            work / "store",
            args.k,
            shard_size=args.shard_size,
            exclude_self=(m == n),
            search=search,
            progress=lambda d, t: print(
                f"  {n:,} x {m:,}: shard {d}/{t} at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            ),
        )
        secs = time.perf_counter() - t0
        after = status_kb("self", "VmHWM") / 1024
        store = SimilarityStore(work / "store")
        assert store.is_complete()
        recall = store_recall(store, x, m, args.k, args.recall) if args.recall else (None, None)
        disk = sum(p.stat().st_size for p in (work / "store").glob("part-*.parquet")) / 2**20
        rows.append((n, m, x.nbytes / 2**20, disk, secs, before, after, store.manifest["search"], recall))
        shutil.rmtree(work, ignore_errors=True)
        del x
    data = f"{args.clusters:,} clusters (spread {args.spread})" if args.clusters else "uniform on the sphere"
    print(f"\ntop-K store: D={args.dim}, K={args.k}, shards of {args.shard_size:,}, data {data}\n")
    print(
        "| queries | database | search | inputs (MiB) | output on disk (MiB) | wall (s) | peak RSS before (MiB) "
        "| peak RSS after (MiB) | growth (MiB) | recall@K | exact scan (queries/s) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, m, inp, disk, secs, before, after, how, (recall, qps) in rows:
        how = ", ".join(f"{k} {v}" for k, v in how.items() if k != "seed").replace("method ", "")
        rec, exact = ("-", "-") if recall is None else (f"{recall:.4f}", f"{qps:.0f}")
        print(
            f"| {n:,} | {m:,} | {how} | {inp:.0f} | {disk:.0f} | {secs:.0f} | {before:.0f} | {after:.0f} "
            f"| {after - before:.0f} | {rec} | {exact} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rerank", "topk", "rerank-setup", "rerank-one"])
    ap.add_argument("pos", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--queries", type=int, nargs="+", default=[100_000])
    ap.add_argument("--database", type=int, default=None, help="rerank: 20,000; topk: the queries themselves")
    ap.add_argument("--dim", type=int, default=None, help="rerank: 32; topk: 128")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=None, help="rerank: 20,000; topk: 50,000")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the rerank work folders")
    ap.add_argument("--search", choices=["exact", "ivf"], default="exact", help="topk: exact scan or faiss IVF index")
    ap.add_argument("--nlist", type=int, default=0, help="topk ivf: inverted lists (0: about 4 sqrt(database))")
    ap.add_argument("--nprobe", type=int, default=32, help="topk ivf: lists scanned per query")
    ap.add_argument("--clusters", type=int, default=10_000, help="topk: Gaussian clusters in the data (0: uniform)")
    ap.add_argument("--spread", type=float, default=1.0, help="topk: noise scale around each cluster centre")
    ap.add_argument("--recall", type=int, default=0, help="topk: measure recall@K on this many sampled queries")
    args = ap.parse_args()
    rerank_like = args.what != "topk"
    args.database = args.database or (20_000 if rerank_like else 0)
    args.dim = args.dim or (32 if rerank_like else 128)
    args.shard_size = args.shard_size or (20_000 if rerank_like else 50_000)
    if args.what == "rerank-setup":
        rerank_setup(Path(args.pos[0]), int(args.pos[1]), args)
        return
    if args.what == "rerank-one":
        print(json.dumps(rerank_one(Path(args.pos[0]), int(args.pos[1]), args)))
        return
    tmp = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    try:
        cmd_rerank(args) if args.what == "rerank" else cmd_topk(args)
    finally:
        if tmp:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
