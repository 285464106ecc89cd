"""``ssr data ...`` commands: prepare the built-in dataset, download published data,
import the authors' landmark features, build a top-K similarity store from features. ``flows.cli`` mounts them with :func:`register`;
``python -m storage.cli data ...`` runs them standalone."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from storage.distractors import import_distractors
from storage.download import SOURCES, download
from storage.errors import StorageError
from storage.glyphs import prepare_glyphs
from storage.landmarks import import_landmarks
from storage.simstore import build_topk_store_from_tables
from storage.topk import TopkSearch


def _prepare(args: argparse.Namespace) -> int:
    info = prepare_glyphs(Path(args.root), seed=args.seed, size=args.size)
    print(json.dumps(info, indent=1, default=str))
    return 0


def _download(args: argparse.Namespace) -> int:
    print(download(args.name, Path(args.root), url=args.url, sha256=args.sha256))
    return 0


def _import_landmarks(args: argparse.Namespace) -> int:
    written = import_landmarks(Path(args.pickle), Path(args.out), gnd_path=args.gnd)
    for key, path in written.items():
        print(f"{key}: {path}")
    return 0


def _import_distractors(args: argparse.Namespace) -> int:
    done = import_distractors(args.table, args.distractors, out=args.out, block_rows=args.block_rows)
    print(
        json.dumps(
            {
                "table": str(done.table),
                "rows_before": done.n_before,
                "added": done.n_added,
                "first_id": done.first_id,
                "dim": done.dim,
            },
            indent=1,
        )
    )
    return 0


def _topk(args: argparse.Namespace) -> int:
    search = TopkSearch(method=args.search, nlist=args.nlist, nprobe=args.nprobe)
    store = build_topk_store_from_tables(
        args.queries,
        args.database,
        Path(args.out),
        args.k,
        query_split=args.query_split,
        database_split=args.database_split,
        normalise=args.normalise,
        exclude_self=args.exclude_self,
        shard_size=args.shard_size,
        search=search,
        progress=lambda d, t: print(f"shard {d}/{t}", file=sys.stderr, flush=True),
    )
    print(
        json.dumps(
            {
                "store": str(store.path),
                "queries": store.n_queries,
                "k": store.k,
                "shards": store.n_shards,
                "search": store.manifest["search"],
            },
            indent=1,
        )
    )
    return 0


def _guarded(fn):
    """Handler wrapper: bad input (StorageError, other ValueError) or a file-system problem
    (missing input, unwritable or full output folder) -> one line on stderr, exit 2;
    anything else is a bug and keeps its traceback."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (StorageError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    handler.__name__ = fn.__name__
    return handler


def _set_handler(p: argparse.ArgumentParser, fn) -> None:
    h = _guarded(fn)
    p.set_defaults(handler=h, func=h)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command group to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare, download and import data sets")
    sub = data.add_subparsers(
        dest="data_command", required=True, metavar="{prepare,download,import-landmarks,import-distractors,topk}"
    )

    p = sub.add_parser("prepare", help="render the built-in glyphs dataset (no download)")
    p.add_argument(
        "name",
        nargs="?",
        default="glyphs",
        choices=["glyphs"],
        help="the built-in dataset to render (only 'glyphs'; real data sets: `ssr data download`)",
    )
    p.add_argument(
        "--root", default="data", help="data root; the dataset lands in <root>/glyphs (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        default="default",
        choices=["small", "default"],
        help="size preset: small (tests, smoke runs) or default (default: %(default)s)",
    )
    _set_handler(p, _prepare)

    p = sub.add_parser("download", help="download a published data set or model")
    p.add_argument("name", choices=sorted(SOURCES), metavar="NAME", help=f"one of: {', '.join(sorted(SOURCES))}")
    p.add_argument("--root", default="data", help="data root (default: %(default)s)")
    p.add_argument("--url", default=None, help="override the URL (also SSR_DATA_URL_<NAME>)")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the downloaded file")
    _set_handler(p, _download)

    p = sub.add_parser("import-landmarks", help="convert an authors' landmark pickle to features tables")
    p.add_argument("pickle", help="e.g. landmark/gl18_resnet101_roxford5k.pkl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gnd", default=None, help="revisitop ground-truth pickle (gnd_<dataset>.pkl)")
    _set_handler(p, _import_landmarks)

    p = sub.add_parser(
        "import-distractors", help="append distractor features (e.g. R1M) to a test database's features table"
    )
    p.add_argument("table", help="the test database's features table, e.g. <import>/database.parquet")
    p.add_argument("distractors", help=".npy (memory-mapped), revisitop-style .pkl or .parquet; (N, D) or (D, N)")
    p.add_argument("--out", default=None, help="write here instead of replacing TABLE (atomically)")
    p.add_argument("--block-rows", type=int, default=65_536, help="rows per block and row group (default: %(default)s)")
    _set_handler(p, _import_distractors)

    p = sub.add_parser("topk", help="build (or resume) a top-K similarity store from features tables")
    p.add_argument("queries", help="features table (Parquet) of the queries")
    p.add_argument("database", help="features table of the database (may be the same file)")
    p.add_argument("--out", required=True, help="store folder (Parquet shards + _manifest.json)")
    p.add_argument("--k", type=int, default=100, help="neighbours per query (default: %(default)s)")
    p.add_argument("--query-split", default=None, help="only rows of this split as queries (e.g. query)")
    p.add_argument("--database-split", default=None, help="only rows of this split as database (e.g. database)")
    p.add_argument("--shard-size", type=int, default=50_000, help="queries per shard (default: %(default)s)")
    p.add_argument("--exclude-self", action="store_true", help="drop the database item with the query's own id")
    p.add_argument(
        "--no-normalise",
        dest="normalise",
        action="store_false",
        help="score raw inner products (default: cosine, rows L2-normalised)",
    )
    p.add_argument(
        "--search",
        choices=["exact", "ivf"],
        default="exact",
        help="exact scan, or an approximate faiss IVF index for large databases (default: %(default)s)",
    )
    p.add_argument("--nlist", type=int, default=0, help="ivf: inverted lists (default: about 4 sqrt(database size))")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: lists scanned per query (default: %(default)s)")
    _set_handler(p, _topk)
    return data


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``data`` command (handlers already turn StorageError into exit 2)."""
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssr", description="SSR pipeline data commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
