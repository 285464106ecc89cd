"""Benchmark: build the top-k similarity store of N x D features against themselves.

    python benchmarks/bench_topk_store.py --n 200000          # one size
    python benchmarks/bench_topk_store.py --n 50000 --n 200000  # each size in its own process

Prints, per N: wall time, the size of the inputs, peak RSS (VmHWM) before and after the
build, and the growth of the peak during the build. The build searches the database block by
block (faiss IndexFlatIP per block, results merged in a faiss ResultHeap; ``storage.topk``) and writes one
shard at a time, so the growth stays at a few tens of MiB whatever N is (it depends on block_size,
db_block_size, shard_size and K only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _features(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32, L2-normalised, generated in chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x[a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
        x[a:b] /= np.linalg.norm(x[a:b], axis=1, keepdims=True)
    return x


def run_one(n: int, dim: int, k: int, shard_size: int, block_size: int, db_block_size: int, out: Path | None) -> dict:
    import faiss  # noqa: F401  (libraries loaded before the baseline is taken)
    import pyarrow.parquet  # noqa: F401

    from storage.simstore import build_topk_store

    x = _features(n, dim, seed=0)
    ids = np.arange(n, dtype=np.int64)
    # warm-up on a tiny problem: BLAS/OpenMP buffers and thread stacks are allocated once
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        build_topk_store(x[:512], ids[:512], x[:512], ids[:512], Path(tmp) / "w", min(k, 511), exclude_self=True)
    peak_before = _status_kib("VmHWM")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t0 = time.perf_counter()
        store = build_topk_store(
            x,
            ids,
            x,
            ids,
            Path(tmp) / "store",
            k,
            shard_size=shard_size,
            block_size=block_size,
            db_block_size=db_block_size,
            exclude_self=True,
            source_hashes={"bench": str(n)},
        )
        wall = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (Path(tmp) / "store").iterdir())
        assert store.is_complete()
        sh = store.read_shard(0)
        assert sh.neighbor_ids.shape == (min(shard_size, n), k)
    peak_after = _status_kib("VmHWM")
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "shard_size": shard_size,
        "block_size": block_size,
        "db_block_size": db_block_size,
        "threads": os.cpu_count(),
        "wall_s": round(wall, 1),
        "input_mib": round(x.nbytes / 2**20, 1),
        "output_disk_mib": round(disk / 2**20, 1),
        "peak_rss_before_build_mib": round(peak_before / 1024, 1),
        "peak_rss_after_build_mib": round(peak_after / 1024, 1),
        "peak_growth_during_build_mib": round((peak_after - peak_before) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="number of features (repeatable; default 200000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--block-size", type=int, default=1024, help="query rows per search call")
    ap.add_argument("--db-block-size", type=int, default=16384, help="database rows per block")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the temporary store")
    args = ap.parse_args(argv)
    sizes = args.n or [200_000]
    if len(sizes) > 1:  # one process per size, so each peak RSS is its own
        for n in sizes:
            cmd = [
                sys.executable,
                __file__,
                "--n",
                str(n),
                "--dim",
                str(args.dim),
                "--k",
                str(args.k),
                "--shard-size",
                str(args.shard_size),
                "--block-size",
                str(args.block_size),
                "--db-block-size",
                str(args.db_block_size),
            ]
            if args.tmp:
                cmd += ["--tmp", str(args.tmp)]
            subprocess.run(cmd, check=True)
        return 0
    print(
        json.dumps(run_one(sizes[0], args.dim, args.k, args.shard_size, args.block_size, args.db_block_size, args.tmp)),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
