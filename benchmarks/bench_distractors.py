"""Top-K store figures for revisited Oxford / Paris + distractors at the published width (D = 2048).

Two builds with ``storage.simstore.build_topk_store`` (exact scan), synthetic L2-normalised
features (``bench_scale.unit_vectors``), K = 100:

- ``queries``: the 70 test queries against a database of N items (what features-only, QE and
  SSR need);
- ``database``: a sample of S database items against the same N items (k-reciprocal needs
  the top-k1 of every database item; the rate gives the N x N build time).

    python benchmarks/bench_distractors.py --database 100000 200000 --sample 2000

Prints a Markdown table: wall time, queries/s and the extrapolated time at 1M.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_scale import unit_vectors  # noqa: E402
from storage.simstore import build_topk_store  # noqa: E402


def timed_build(q: np.ndarray, db: np.ndarray, k: int) -> float:
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        build_topk_store(q, np.arange(len(q)), db, np.arange(len(db)), Path(work) / "topk", k, shard_size=50_000)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--sample", type=int, default=2000, help="database items searched for the N x N rate")
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| database N | D | queries searched | wall (s) | queries/s | extrapolated to a 1M database |")
    print("|---:|---:|---|---:|---:|---|")
    for n in args.database:
        db = unit_vectors(rng, n, args.dim)
        for name, q in (
            ("test queries", unit_vectors(rng, args.queries, args.dim)),
            ("database sample", db[: args.sample]),
        ):
            wall = timed_build(q, db, args.k)
            rate = len(q) / wall
            scale = 1_000_000 / n  # the scan time grows linearly with the database
            at_1m = (
                f"{len(q)} queries: {wall * scale:.0f} s"
                if name == "test queries"
                else f"all 1M items as queries (k-reciprocal): {1_000_000 / rate * scale / 3600:.0f} h"
            )
            print(f"| {n:,} | {args.dim} | {len(q):,} {name} | {wall:.1f} | {rate:.0f} | {at_1m} |", flush=True)
        del db


if __name__ == "__main__":
    main()
