"""Benchmark: the re-rankers' candidate search on the Ray actor pool, 1 actor against 2.

Prints a Markdown table (one run, so the ratio compares like with like). Run from the
repository root:

    python benchmarks/bench_candidate_search.py [--n-db 200000] [--dim 64] [--rows 8192] [--k 21]

What is timed: ``CandidateSearchPool.top(rows, k)``, the top-k search of ``rows``
candidate features (e.g. the union of the queries' shortlists) against an L2-normalised
random database, cut into blocks of ``--rows-per-task`` rows, each block one task on an
actor (one CPU, one BLAS thread, the database shared from the object store). The pool is
started and warmed up (one small search) before timing; the best of ``--repeats`` runs is
reported. The in-process search (``CandidateSearcher``, one BLAS thread) is the reference, and
every pool's result is checked against it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssr_tasks.retrieval.evaluate import CandidateSearcher  # noqa: E402
from ssr_tasks.retrieval.ray_jobs import CandidateSearchPool  # noqa: E402
from ssr_tasks.services import init_ray  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-db", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8192, help="candidate rows searched (default: %(default)s)")
    ap.add_argument("--k", type=int, default=21, help="neighbours per row (k1 + 1 of k-reciprocal at k1 = 20)")
    ap.add_argument("--rows-per-task", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    db = _unit(rng.standard_normal((a.n_db, a.dim), dtype=np.float32))
    rows = db[rng.choice(a.n_db, a.rows, replace=False)]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        t_local, (ref_ids, _) = _best(lambda: CandidateSearcher(db, threads=1).top(rows, a.k), a.repeats)
    init_ray()
    results = [("in-process, 1 thread (reference)", t_local)]
    for n in (1, 2):
        with CandidateSearchPool(db, n_actors=n, rows_per_task=a.rows_per_task) as pool:
            pool.top(rows[: 2 * n], a.k)  # warm-up: actors started, database mapped
            t, (ids, _) = _best(lambda pool=pool: pool.top(rows, a.k), a.repeats)
        if ids.tolist() != ref_ids.tolist():
            raise SystemExit(f"pool of {n}: result differs from the in-process search")
        results.append((f"Ray pool, {n} actor{'s' if n > 1 else ''}", t))
    print(
        f"candidate search: {a.rows:,} rows x top-{a.k} of {a.n_db:,} x {a.dim} (float32), "
        f"{a.rows_per_task} rows per task; best of {a.repeats}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print("| search | seconds | rows / s | speed-up over 1 actor |")
    print("|---|---:|---:|---:|")
    one = results[1][1]
    for name, t in results:
        print(f"| {name} | {t:.2f} | {a.rows / t:,.0f} | {one / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
