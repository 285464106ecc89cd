"""The retrieval table at scale: the built-in glyphs + N rendered distractors, and top-K build figures.

``table`` (issue 20, item 4): the glyph retrieval set (default size: 70 queries, 5,000
database images) with N distractors (``storage.glyphs.distractors``: renderings of
characters neither queried nor trained on, embedded by the same backbone, block by block),
for each N of ``--sizes``:

1. once: the glyphs, the backbone (``--backbone`` or pretrained here), the features of the
   test set and the training clusters, every method's setting chosen on the validation
   queries as the pipeline chooses them (its grids, ``--val-protocol``: mirror-test, the
   pipeline's default, or held-out), made once and used at every N; SSR trained on the
   training clusters;
2. per N: the distractors' features (reused from a smaller N's blocks), the database as a
   memory-mapped .npy (test database first, then the distractors; L2-normalised);
3. per method, in a fresh process (so its peak RSS is its own): the method's ranking of the
   70 queries against the memory-mapped database at the chosen setting
   (``ssr_tasks.retrieval.evaluate.method_rankings``, database searches in blocks), then
   SSR on its top-k. Printed: mAP M/H before and after SSR, ms per query of the method and
   of SSR, and the process's peak RSS (it includes the pages of the memory map it touched).

It stops before an N when the time spent passes ``--budget-min``, and says where it stopped
with the projected time of the next N (the distractor build grows linearly with N).

    python benchmarks/bench_distractors.py table --sizes 0 100000 1000000 --home /tmp/bench-distractors \\
        --glyphs-root runs/data --backbone runs/backbones/glyphs-conv4-64-<hash>.pt

``topk``: top-K store builds for revisited Oxford / Paris + distractors at the published width
(D = 2048) on synthetic unit vectors (``storage.simstore.build_topk_store``, exact scan, K = 100):
the 70 test queries against N items, and a sample of S database items against the same N
(the rate gives the time of every database item's list, what an unbounded k-reciprocal needs).

    python benchmarks/bench_distractors.py topk --database 100000 200000 --sample 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_SEED = 0


# ---- topk: the store builds at D = 2048 -------------------------------------------------------------------


def timed_build(q: np.ndarray, db: np.ndarray, k: int) -> float:
    from storage.simstore import build_topk_store

    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        build_topk_store(q, np.arange(len(q)), db, np.arange(len(db)), Path(work) / "topk", k, shard_size=50_000)
        return time.perf_counter() - t0


def topk_main(args: argparse.Namespace) -> None:
    from benchmarks.bench_scale import unit_vectors

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


# ---- table: the retrieval table with N glyph distractors ------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _backbone(args: argparse.Namespace, fewshot_root: Path, home: Path) -> Path:
    from ssr_tasks.backbone import pretrain_backbone

    if args.backbone:
        return Path(args.backbone)
    _log("pretraining conv4-64 on the glyphs' base classes (3 epochs)")
    return pretrain_backbone(fewshot_root, "glyphs", "conv4-64", home / "backbone.pt", epochs=3, batch_size=64, lr=0.1)


def _base_table(data: dict, backbone: Path, home: Path) -> Path:
    """The test set (database, queries) and the training clusters (split train / val) as one table."""
    import torch

    from ssr_tasks.backbone import dataset_spec, extract_split_features, load_backbone
    from storage.features import write_features
    from storage.fewshot import SplitIndex, list_split
    from storage.glyphs import GND_NAME
    from storage.landmark_tables import holdout_clusters
    from storage.landmarks import read_gnd

    out = home / "features-base.parquet"
    if out.exists():
        return out
    root = Path(data["retrieval_root"])
    gt = read_gnd(root / "test" / GND_NAME)
    spec = dataset_spec("glyphs")
    net = load_backbone("conv4-64", "glyphs", backbone, torch.device("cpu"))

    def names(n: list[str]) -> SplitIndex:
        return SplitIndex(root / "test" / "jpg", [f"{x}.png" for x in n], np.zeros(len(n), np.int64), ["-"])

    db = extract_split_features(net, names(gt.imlist), spec, "cpu")
    qs = extract_split_features(net, names(gt.qimlist), spec, "cpu")
    train = list_split(root, "train")
    tr = extract_split_features(net, train, spec, "cpu")
    clusters = [train.classes[c] for c in train.labels]
    held = holdout_clusters(np.asarray(clusters), 0.05, 0)
    write_features(
        out,
        ids=np.arange(len(db) + len(qs) + len(tr)),
        labels=["db"] * len(db) + ["query"] * len(qs) + clusters,
        splits=["database"] * len(db) + ["query"] * len(qs) + np.where(held, "val", "train").tolist(),
        embeddings=np.concatenate([db, qs, tr]),
        metadata={"dataset": "glyphs-retrieval", "backbone": "conv4-64", "checkpoint_hash": backbone.name},
    )
    return out


def _choose_and_train(base: Path, gnd: Path, home: Path, iterations: int, protocol: str) -> tuple[Path, Path]:
    """Every method's setting chosen on validation and SSR trained on the training clusters, as
    the pipeline's ``rank_methods`` / ``train_retrieval`` do for the test set without distractors:
    the pipeline's default grids, its validation protocol (``protocol``: ``mirror-test``, the
    default, or ``held-out``), its neighbour-count scaling, lr_dni 1e-2. The choices are made
    once (at N = 0) and used at every N. Cached per protocol and iteration count."""
    from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams
    from ssr_tasks.retrieval.handoffs import RetrievalFeatures
    from ssr_tasks.retrieval.train import train_retrieval, validation_of
    from ssr_tasks.retrieval.validation import choose_on_validation, grid_scale, mirror_validation
    from storage.features import read_features

    test_db = read_features(base, split="database")
    n_queries = len(read_features(base, split="query").ids)
    features = RetrievalFeatures(
        path=str(base),
        dim=test_db.dim,
        n_database=len(test_db.ids),
        n_queries=n_queries,
        train_path=str(base),
        gnd=str(gnd),
    )
    cfg = mirror_validation(RetrievalTrainParams(lr_dni=1e-2, iterations=iterations, val_protocol=protocol), features)
    choice_path = home / f"choice-{protocol}.pkl"
    model_path = home / f"ssr-{protocol}-{iterations}" / "summary.json"
    val = validation_of(cfg, base)
    if not choice_path.exists():
        scale = grid_scale(cfg, len(val.database), features.n_database)
        t0 = time.perf_counter()
        choice, _ = choose_on_validation(val, RetrievalBaselineParams(), scale)
        _log(
            f"settings chosen on {protocol} validation ({len(val.queries)} queries, {len(val.database)} database "
            f"items, neighbour counts x {scale:.3g}) in {time.perf_counter() - t0:.0f} s: {choice.as_params()}"
        )
        tmp = choice_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(choice))
        os.replace(tmp, choice_path)
    if not model_path.exists():
        train = read_features(base, split="train")
        t0 = time.perf_counter()
        summary = train_retrieval(cfg, _unit(train.embeddings), np.asarray(train.labels), val, model_path.parent)
        _log(f"SSR trained in {time.perf_counter() - t0:.0f} s, validation mAP {100 * summary['best_val']:.2f}")
    return choice_path, model_path


def _distractor_db(args, data: dict, backbone: Path, base: Path, home: Path, n: int) -> tuple[Path, float]:
    """The L2-normalised database (test database, then n distractors) as a .npy; seconds spent."""
    import torch

    from ssr_tasks.backbone import dataset_spec, load_backbone
    from storage.features import iter_features, read_features
    from storage.glyphs import fonts as gf
    from storage.glyphs.distractors import build_distractor_parts, distractor_characters, normalise

    out = home / f"db-{n}.npy"
    if out.exists():
        return out, 0.0
    t0 = time.perf_counter()
    parts: list[Path] = []
    if n:
        fonts = gf.load_fonts()
        pool = gf.class_pool(fonts)
        chars = distractor_characters(data["fewshot_root"], data["retrieval_root"], [c.char for c in pool])
        spec = dataset_spec("glyphs")
        net = load_backbone("conv4-64", "glyphs", backbone, torch.device("cpu"))

        @torch.no_grad()
        def embed(images: np.ndarray) -> np.ndarray:
            x = normalise(images, spec)
            return np.concatenate([net(torch.from_numpy(x[a : a + 256])).numpy() for a in range(0, len(x), 256)])

        def progress(done: int, total: int) -> None:
            if done % 10 == 0 or done == total:
                _log(f"distractors: {done}/{total} blocks ({time.perf_counter() - t0:.0f} s)")

        parts = build_distractor_parts(
            home / "distractor-parts",
            n,
            embed,
            chars=chars,
            font_paths={f.name: f.path for f in fonts},
            fonts_of={c.char: c.fonts for c in pool},
            seed=BENCH_SEED,
            metadata={"dataset": "glyphs-retrieval", "backbone": "conv4-64", "checkpoint_hash": backbone.name},
            progress=progress,
        )
    test_db = read_features(base, split="database")
    N0, D = test_db.embeddings.shape
    tmp = out.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N0 + n, D))
    mm[:N0] = _unit(test_db.embeddings)
    row = N0
    for p in parts:
        for batch in iter_features(p):
            take = min(len(batch.ids), N0 + n - row)
            mm[row : row + take] = _unit(batch.embeddings[:take])
            row += take
    mm.flush()
    del mm
    os.replace(tmp, out)
    return out, time.perf_counter() - t0


def _method_child(args: argparse.Namespace) -> None:
    """One method on one database, in this fresh process; prints one JSON line."""
    import torch

    from benchmarks.bench_scale import status_kb
    from ssr_model.metrics import revisited_map
    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.retrieval.evaluate import method_rankings
    from storage.checkpoints import load_state_dict
    from storage.landmarks import read_gnd

    limit = int(args.max_gib * 2**30)  # address space: a method that outgrows it fails here, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    db = np.load(args.db, mmap_mode="r")
    queries = np.load(args.queries)
    gnd = read_gnd(Path(args.gnd)).gnd
    choice = pickle.loads(Path(args.choice).read_bytes())
    choice = type(choice)(choice.qe_n, choice.krecip, (), choice.shortlist, (args.method,))
    rss0 = status_kb("self", "VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    (m,) = method_rankings(queries, db, choice, normalised=True)  # unit rows: the map is never copied
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = json.loads(Path(args.model).read_text())
    cfg = RetrievalTrainParams(**summary["config"])
    model = cfg.build(db.shape[1])
    model.load_state_dict(load_state_dict(Path(summary["best_path"])))
    model.eval()
    t1 = time.perf_counter()
    with torch.no_grad():
        top = m.ranks[:, : cfg.k]
        neighbours = torch.from_numpy(np.asarray(db[top.ravel()])).view(*top.shape, -1)  # (Q, k, D)
        refined = model(torch.from_numpy(np.ascontiguousarray(m.query, dtype=np.float32)), neighbours)
        order = refined.argsort(dim=-1, descending=True, stable=True).numpy()
    after = m.ranks.copy()
    after[:, : cfg.k] = np.take_along_axis(top, order, axis=1)
    ssr_seconds = time.perf_counter() - t1
    before_map, after_map = revisited_map(m.ranks, gnd), revisited_map(after, gnd)
    Q = len(queries)
    print(
        json.dumps(
            {
                "method": args.method,
                "M": before_map["medium"]["map"],
                "H": before_map["hard"]["map"],
                "ssr_M": after_map["medium"]["map"],
                "ssr_H": after_map["hard"]["map"],
                "ms_per_query": 1000 * seconds / Q,
                "cpu_s": cpu,
                "ssr_ms_per_query": 1000 * ssr_seconds / Q,
                # VmHWM: this process's own peak. ru_maxrss is not: Linux carries the parent's
                # peak across fork + exec, so a child of a 1 GiB parent reports >= 1 GiB
                "peak_rss_mib": status_kb("self", "VmHWM") / 1024,
                "rss_after_imports_mib": rss0 / 1024,
            }
        )
    )


def table_main(args: argparse.Namespace) -> None:
    from ssr_model.baselines import RETRIEVAL_METHODS
    from storage.features import read_features
    from storage.glyphs import GND_NAME, prepare_glyphs

    start = time.perf_counter()
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    data = prepare_glyphs(Path(args.glyphs_root) if args.glyphs_root else home / "data", seed=0, size="default")
    backbone = _backbone(args, Path(data["fewshot_root"]), home)
    base = _base_table(data, backbone, home)
    gnd = Path(data["retrieval_root"]) / "test" / GND_NAME
    choice, model = _choose_and_train(base, gnd, home, args.ssr_iterations, args.val_protocol)
    queries = home / "queries.npy"
    if not queries.exists():
        np.save(queries, _unit(read_features(base, split="query").embeddings))
    setup = time.perf_counter() - start
    _log(f"setup (glyphs, backbone, features, choices, SSR) {setup:.0f} s")
    methods = args.methods or list(RETRIEVAL_METHODS)
    print(f"Setup: {setup:.0f} s. Budget {args.budget_min} min from the start.\n")
    print(
        "| N distractors | database | method | mAP M | mAP H | + SSR M | + SSR H | ms/query | CPU s | "
        "SSR ms/query | peak RSS MiB |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    last_rate = None
    for n in sorted(args.sizes):
        spent = time.perf_counter() - start
        if spent > 60 * args.budget_min:
            guess = f", projected distractor build {n * last_rate / 60:.0f} min" if last_rate else ""
            print(f"\nStopped before N = {n:,}: {spent / 60:.0f} min spent of the {args.budget_min} min budget{guess}.")
            break
        db, build_s = _distractor_db(args, data, backbone, base, home, n)
        if n and build_s:
            last_rate = build_s / n
        size_mib = db.stat().st_size / 2**20
        _log(f"N = {n:,}: database {db.name} ({size_mib:.0f} MiB) in {build_s:.0f} s")
        t_table = time.perf_counter()
        for method in methods:
            cmd = [sys.executable, __file__, "_method", "--db", str(db), "--queries", str(queries), "--gnd", str(gnd)]
            cmd += ["--choice", str(choice), "--model", str(model), "--method", method]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if res.returncode != 0:
                print(f"| {n:,} | | {method} | failed: {res.stderr.strip().splitlines()[-1][:120]} |||||||||")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows = int(np.load(db, mmap_mode="r").shape[0])
            print(
                f"| {n:,} | {rows:,} | {method} | {r['M']:.2f} | {r['H']:.2f} | {r['ssr_M']:.2f} | {r['ssr_H']:.2f} | "
                f"{r['ms_per_query']:.1f} | {r['cpu_s']:.1f} | {r['ssr_ms_per_query']:.2f} | {r['peak_rss_mib']:.0f} |",
                flush=True,
            )
        print(
            f"|  |  | N = {n:,}: distractors built in {build_s:.0f} s; database {size_mib:.0f} MiB (memory-mapped); "
            f"every method in {time.perf_counter() - t_table:.0f} s ||||||||||",
            flush=True,
        )
    else:
        print(f"\nAll sizes done in {(time.perf_counter() - start) / 60:.1f} min.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("table", help="the retrieval table with N glyph distractors")
    t.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    t.add_argument("--home", default="runs-bench-distractors")
    t.add_argument("--glyphs-root", default=None, help="folder holding (or to hold) the default-size glyphs")
    t.add_argument("--backbone", default=None, help="conv4-64 state dict pretrained on the glyphs (else pretrained)")
    t.add_argument("--ssr-iterations", type=int, default=600)
    t.add_argument(
        "--val-protocol",
        choices=["mirror-test", "held-out"],
        default="mirror-test",
        help="validation the choices and SSR's checkpoint are made on (the pipeline's train.val_protocol)",
    )
    t.add_argument("--budget-min", type=float, default=60.0)
    t.add_argument("--methods", nargs="*", default=None)
    k = sub.add_parser("topk", help="top-K store builds at D = 2048 on synthetic features")
    k.add_argument("--database", type=int, nargs="+", default=[100_000])
    k.add_argument("--dim", type=int, default=2048)
    k.add_argument("--queries", type=int, default=70)
    k.add_argument("--sample", type=int, default=2000, help="database items searched for the N x N rate")
    k.add_argument("--k", type=int, default=100)
    c = sub.add_parser("_method", help=argparse.SUPPRESS)
    for name in ("--db", "--queries", "--gnd", "--choice", "--model", "--method"):
        c.add_argument(name, required=True)
    c.add_argument("--max-gib", type=float, default=12.0, help="address-space limit of the method's process")
    args = ap.parse_args()
    {"table": table_main, "topk": topk_main, "_method": _method_child}[args.mode](args)


if __name__ == "__main__":
    main()
