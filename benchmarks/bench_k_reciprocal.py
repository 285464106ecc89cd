"""Benchmark: vectorised k-reciprocal re-ranking against the loop oracle.

Prints a Markdown table. Run from the repository root:

    python benchmarks/bench_k_reciprocal.py [--repeats 20] [--skip-large-oracle]

Cases: a 5-way few-shot episode graph (5 prototypes as gallery + 75 queries, D = 640) and
an rOxford5k-sized graph (70 queries + 4,930 gallery, D = 2048), k1 = 20, k2 = 6,
lambda = 0.3, random L2-normalised features. The oracle runs once on the large graph.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssr_model.baselines import k_reciprocal  # noqa: E402
from tests.model.k_reciprocal_oracle import k_reciprocal_loop  # noqa: E402


def _graph(n_query: int, n_gallery: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_query + n_gallery, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * feats @ feats.T, 0.0))
    return dist[:n_query, n_query:], dist[:n_query, :n_query], dist[n_query:, n_query:]


def _time(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time in seconds over ``repeats`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="repeats for the episode case (best time kept)")
    parser.add_argument("--skip-large-oracle", action="store_true", help="do not run the loop on 5,000 nodes")
    args = parser.parse_args()

    cases = [
        ("episode: 75 queries + 5 prototypes, D=640", 75, 5, 640, args.repeats, args.repeats),
        ("rOxford5k-size: 70 queries + 4,930 gallery, D=2048", 70, 4930, 2048, 3, 0 if args.skip_large_oracle else 1),
    ]
    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}\n")
    print("| graph | nodes | product (ms) | loop oracle (ms) | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n_query, n_gallery, dim, rep_fast, rep_loop in cases:
        blocks = _graph(n_query, n_gallery, dim, seed=0)
        t_fast, fast = _time(lambda: k_reciprocal(*blocks, k1=20, k2=6, lambda_value=0.3), rep_fast)
        if rep_loop:
            t_loop, slow = _time(lambda: k_reciprocal_loop(*blocks, k1=20, k2=6, lambda_value=0.3), rep_loop)
            loop_cell, speed, diff = (
                f"{1e3 * t_loop:.1f}",
                f"{t_loop / t_fast:.1f}x",
                f"{np.abs(fast - slow).max():.1e}",
            )
        else:
            loop_cell = speed = diff = "-"
        print(f"| {label} | {n_query + n_gallery} | {1e3 * t_fast:.1f} | {loop_cell} | {speed} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
