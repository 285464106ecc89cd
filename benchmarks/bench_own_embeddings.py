"""Benchmark: a user's N x 768 embeddings table, imported and searched, in bounded memory.

    python benchmarks/bench_own_embeddings.py                 # N = 1,000,000
    python benchmarks/bench_own_embeddings.py --n 200000 --dir /tmp/bench

Three phases, each in its own process so that each has its own peak RSS (ru_maxrss):

1. write: a synthetic N x D float32 table as pandas writes it (``pa.Table.from_pandas`` of a
   column of numpy rows: list<float>), in row groups of ``--row-group`` rows;
2. import: :func:`storage.own_data.import_fewshot_table` into the canonical table
   (fixed_size_list<float32>[D]), streamed batch by batch;
3. search: exact top-K (inner product, ``storage.topk.topk_search``) of ``--queries``
   queries against the imported table read block by block with
   :func:`storage.features.iter_features`.

Prints, per phase: wall time, peak RSS, peak RSS of the same process right after its
imports (the libraries' share) and the ratio of the peak to the table's float32 size
(N * D * 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak into
    it across fork + exec (here the parent is a small driver, so the figures were not affected)."""
    from benchmarks.bench_scale import status_kb

    return status_kb("self", "VmHWM") / 1024.0


def _rows(a: int, b: int, dim: int) -> np.ndarray:
    """Rows a..b of the synthetic table: (b - a, dim) float32, L2-normalised, seeded by a."""
    x = np.random.default_rng(a).standard_normal((b - a, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def phase_write(n: int, dim: int, row_group: int, src: Path) -> dict:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = _peak_mib()
    t0 = time.perf_counter()
    writer = None
    for a in range(0, n, row_group):
        b = min(n, a + row_group)
        df = pd.DataFrame(
            {
                "id": np.arange(a, b),
                "label": [f"c{i % 1000}" for i in range(a, b)],
                "split": np.where(np.arange(a, b) % 10 == 0, "test", "train"),
                "embedding": list(_rows(a, b, dim)),
            }
        )
        table = pa.Table.from_pandas(df, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(src, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return {
        "wall_s": time.perf_counter() - t0,
        "base_mib": base,
        "peak_mib": _peak_mib(),
        "schema": str(pq.ParquetFile(src).schema_arrow.field("embedding").type),
    }


def phase_import(src: Path, out_dir: Path) -> dict:
    from storage.own_data import import_fewshot_table

    base = _peak_mib()
    t0 = time.perf_counter()
    imported = import_fewshot_table(src, out_dir)
    return {
        "wall_s": time.perf_counter() - t0,
        "base_mib": base,
        "peak_mib": _peak_mib(),
        "path": str(imported.path),
        "dim": imported.dim,
        "n_rows": imported.n_rows,
    }


def phase_search(table: Path, n_queries: int, k: int, block_rows: int) -> dict:
    import pyarrow.parquet as pq

    from storage.features import iter_features, lookup_embeddings
    from storage.topk import topk_search

    base = _peak_mib()
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    n = pq.ParquetFile(table).metadata.num_rows
    query_ids = np.sort(rng.choice(n, n_queries, replace=False))  # the synthetic ids are 0..N-1
    queries, found = lookup_embeddings(table, query_ids)
    assert found.all()
    t_lookup = time.perf_counter() - t0
    db_ids: list[np.ndarray] = []

    def blocks():
        for part in iter_features(table, batch_size=block_rows):
            db_ids.append(part.ids)
            yield part.embeddings

    rows, scores = topk_search(queries, blocks(), k)
    ids = np.concatenate(db_ids)[rows]
    assert (ids[:, 0] == query_ids).all(), "each query's best match is itself"
    return {"wall_s": time.perf_counter() - t0, "lookup_s": t_lookup, "base_mib": base, "peak_mib": _peak_mib()}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--row-group", type=int, default=50_000, help="rows per row group of the synthetic table")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--block-rows", type=int, default=16_384, help="database rows per iter_features block")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--phase", choices=["write", "import", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.phase == "write":
        print(json.dumps(phase_write(a.n, a.dim, a.row_group, a.src)))
        return
    if a.phase == "import":
        print(json.dumps(phase_import(a.src, a.out)))
        return
    if a.phase == "search":
        print(json.dumps(phase_search(a.src, a.queries, a.k, a.block_rows)))
        return
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        work = Path(tmp)
        src = work / "user.parquet"
        w = _child(
            [
                "--phase",
                "write",
                "--n",
                str(a.n),
                "--dim",
                str(a.dim),
                "--row-group",
                str(a.row_group),
                "--src",
                str(src),
            ]
        )
        i = _child(["--phase", "import", "--src", str(src), "--out", str(work / "imported")])
        table = Path(i["path"])
        s = _child(
            [
                "--phase",
                "search",
                "--src",
                str(table),
                "--queries",
                str(a.queries),
                "--k",
                str(a.k),
                "--block-rows",
                str(a.block_rows),
            ]
        )
        f32_mib = a.n * a.dim * 4 / 2**20
        print(
            f"N={a.n:,} D={a.dim} ({w['schema']}, row groups of {a.row_group:,}): float32 size {f32_mib:,.0f} MiB; "
            f"source file {src.stat().st_size / 2**20:,.0f} MiB, imported {table.stat().st_size / 2**20:,.0f} MiB"
        )
        print("| phase | wall (s) | peak RSS (MiB) | RSS after imports (MiB) | peak / float32 table |")
        print("|---|---:|---:|---:|---:|")
        for name, r in (
            ("write (pandas, list<float>)", w),
            ("import_fewshot_table", i),
            (f"top-{a.k} of {a.queries:,} queries (iter_features blocks of {a.block_rows:,})", s),
        ):
            print(
                f"| {name} | {r['wall_s']:.1f} | {r['peak_mib']:,.0f} | {r['base_mib']:,.0f} | "
                f"{r['peak_mib'] / f32_mib:.3f} |"
            )
        print(f"(search: lookup of the query rows {s['lookup_s']:.1f} s)")


if __name__ == "__main__":
    main()
