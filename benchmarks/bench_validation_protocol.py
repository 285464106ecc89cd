"""Does the validation set look like the test set? (issue 20 item 6)

Prints, for a retrieval test set and the validation set drawn from its training clusters,
what decides how a re-ranker behaves: database size, queries, easy / hard / junk items per
query, positives per 1,000 database items, and how much of the database each k1 of the
k-reciprocal grid covers (and its multiple of the positives). Three rows per data set: the
test, the validation as it was (``val_protocol: held-out``) and the validation that mirrors
the test (``mirror-test``: queries spread one per held-out cluster, the database padded with
training items to the test's positives per item, k1 scaled by the database sizes' ratio).

Only labels and ground truth are read (no features, no training):

    python benchmarks/bench_validation_protocol.py --glyphs RUNS/data/glyphs-retrieval
    python benchmarks/bench_validation_protocol.py --landmarks DATA_ROOT --dataset roxford5k
    python benchmarks/bench_validation_protocol.py --fixtures      # the tests' SfM-120k-format pickles

With ``--glyphs`` a fourth row grades the mirrored validation easy / hard / junk by the glyph
test's rule (``validation.glyph_grader``).

With a run's features table (``retrieval-features-*.parquet``: splits database, query, train,
val) and the test ground truth, it also makes the baselines' choices under three validations
(held-out; mirror-test with QE's n as given; mirror-test with QE's n scaled by the positives
per query) and scores every grid point on the test queries (medium mAP), so the choices
compare on the same features and code; it prints each pick's test mAP and the Spearman
correlation of validation and test mAP per method (``--rows-out DIR``: each variant's
val-vs-test table; ``--resplit F``: hold out another fraction of the training clusters, a
copy of the table, SSR not retrained):

    python benchmarks/bench_validation_protocol.py --features TABLE --gnd GND [--train TABLE]

The measured table is in docs/validation.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssr_model.baselines import RETRIEVAL_METHODS  # noqa: E402
from ssr_model.metrics import revisited_map  # noqa: E402
from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams  # noqa: E402
from ssr_tasks.retrieval.handoffs import RetrievalFeatures  # noqa: E402
from ssr_tasks.retrieval.settings import ProtocolProfile, mirrored_database_size, protocol_profile  # noqa: E402
from ssr_tasks.retrieval.train import validation_of  # noqa: E402
from ssr_tasks.retrieval.validation import (  # noqa: E402
    choose_on_validation,
    glyph_grader,
    grid_scale,
    markdown_table,
    mirror_validation,
    qe_scale_for,
    read_test_set,
    score_on_test,
    test_set_profile,
    val_vs_test_rows,
    val_vs_test_summary,
    write_val_vs_test,
)
from storage.features import read_features, read_metadata, write_features  # noqa: E402
from storage.fewshot import list_split  # noqa: E402
from storage.landmark_tables import holdout_clusters, landmark_pickle, validation_ground_truth  # noqa: E402
from storage.landmarks import read_gnd, read_landmark_pickle  # noqa: E402


def profiles(
    test_gnd: Sequence[dict],
    n_test_db: int,
    clusters: np.ndarray,
    holdout_fraction: float,
    holdout_seed: int,
    n_val_queries: int,
    seed: int,
    grader: tuple[Path, Sequence[str]] | None = None,
) -> list[tuple[ProtocolProfile, float]]:
    """(profile, k1 scale) of the test, the held-out validation and the mirrored validation; with
    ``grader`` (a glyphs-retrieval root and the training images' paths, in the order of
    ``clusters``) also the mirrored validation graded easy / hard / junk by the test's rule."""
    test = protocol_profile("test", test_gnd, n_test_db)
    held = holdout_clusters(clusters, holdout_fraction, holdout_seed)
    val_labels, n_train = np.asarray(clusters)[held], int((~held).sum())
    _, db, gt = validation_ground_truth(val_labels, n_val_queries, seed)
    old = protocol_profile("validation, held-out (before)", gt.gnd, len(db))
    _, db, gt = validation_ground_truth(val_labels, n_val_queries, seed, spread=True)
    spread = protocol_profile("validation", gt.gnd, len(db))
    size = mirrored_database_size(spread.positives, len(db), len(db) + n_train, test)
    new = protocol_profile("validation, mirror-test", gt.gnd, size)
    out = [(test, 1.0), (old, 1.0), (new, size / n_test_db)]
    if grader is not None:
        root, paths = grader
        grade = glyph_grader(root, [p for p, h in zip(paths, held) if h])
        _, _, gt = validation_ground_truth(val_labels, n_val_queries, seed, spread=True, grade=grade)
        out.append(
            (protocol_profile("validation, mirror-test, graded by the test's rule", gt.gnd, size), size / n_test_db)
        )
    return out


def glyph_inputs(root: Path) -> tuple[list[dict], int, np.ndarray, list[str]]:
    gt = read_gnd(next((root / "test").glob("gnd_*.pkl")))
    train = list_split(root, "train")
    return gt.gnd, len(gt.imlist), np.asarray([train.classes[c] for c in train.labels]), list(train.paths)


def landmark_inputs(data_root: Path, dataset: str) -> tuple[list[dict], int, np.ndarray]:
    test = read_landmark_pickle(landmark_pickle(data_root, dataset))
    sfm = read_landmark_pickle(landmark_pickle(data_root, "sfm120k"))
    assert sfm.cluster is not None
    return test.gt.gnd, len(test.database), np.asarray(sfm.cluster)


VARIANTS = (  # (name, val_protocol, QE's n scaled)
    ("held-out", "held-out", False),
    ("mirror-test, QE n as given", "mirror-test", False),
    ("mirror-test, QE n scaled", "mirror-test", True),
)


def compare_choices(
    features: RetrievalFeatures, n_val_queries: int, seed: int, rows_out: Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Per method: the point each variant of the validation chooses and its test mAP (medium), the
    best test mAP of the grid, and plain features' test mAP; and per variant and method the
    Spearman correlation of validation and test mAP over the grid. Default grids. rows_out: a folder
    that receives each variant's val-vs-test table (``val_vs_test-<variant>.csv`` and ``.md``)."""
    baselines = RetrievalBaselineParams()
    q, db = read_test_set(features)
    gnd = read_gnd(Path(features.gnd or "")).gnd
    test_pairs = score_on_test(q, db, gnd, baselines)
    test_map = dict(test_pairs)
    test = test_set_profile(features)
    chosen: dict[str, dict[str, str]] = {}
    spearman: list[dict] = []
    for name, protocol, scale_n in VARIANTS:
        train = mirror_validation(
            RetrievalTrainParams(n_val_queries=n_val_queries, seed=seed, val_protocol=protocol), features
        )
        val = validation_of(train, Path(features.train_path), features.dim)
        scale = grid_scale(train, len(val.database), features.n_database)
        qe_scale = qe_scale_for(train, val, test) if scale_n else 1.0
        choice, val_label = choose_on_validation(val, baselines, scale, qe_scale=qe_scale)
        print(
            f"{name}: {len(val.queries)} queries, {len(val.database)} database items, "
            f"neighbour counts x {scale:.4f}, QE n x {qe_scale:.4f}",
            file=sys.stderr,
        )
        labels = {f"{m} n={n}" for m, n in choice.qe_n} | {f"{m} {p.label()}" for m, p in choice.shortlist}
        if choice.krecip is not None:
            labels.add(f"k-reciprocal {choice.krecip.label()}")
        chosen[name] = {label.split(" ", 1)[0]: label for label in labels}
        vvt = val_vs_test_rows(choice, val_label, test_pairs)
        if rows_out is not None:
            slug = name.replace(", ", "-").replace(" ", "-")
            write_val_vs_test(vvt, rows_out / f"val_vs_test-{slug}.csv", f"{name}: QE n x {qe_scale:.4f}")
        summary = val_vs_test_summary(vvt)
        spearman.append({"validation": name, **{s["method"]: s["Spearman val/test"] for s in summary}})
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    plain = revisited_map(np.argsort(-(qn @ dn.T), axis=1, kind="stable"), gnd)
    rows = [{"method": "features (no setting)", "best test mAP of the grid": round(plain["medium"]["map"], 2)}]
    for method in sorted(chosen[VARIANTS[0][0]], key=RETRIEVAL_METHODS.index):
        row: dict = {"method": method}
        for name, _, _ in VARIANTS:
            label = chosen[name][method]
            row[f"{name}: pick"] = label.split(" ", 1)[1]
            row[f"{name}: test mAP"] = round(test_map[label], 2)
        row["best test mAP of the grid"] = round(max(v for k, v in test_map.items() if k.split(" ", 1)[0] == method), 2)
        rows.append(row)
    return rows, spearman


def resplit(features: RetrievalFeatures, fraction: float, holdout_seed: int, out_dir: Path) -> RetrievalFeatures:
    """The features with the training rows' held-out clusters drawn again at ``fraction`` (a copy of
    the table in ``out_dir``; the test rows unchanged). For measuring the hold-out's effect on the
    choices without extracting features again (SSR is not retrained)."""
    t = read_features(Path(features.train_path))
    splits = np.asarray(t.splits, dtype=object)
    rows = np.flatnonzero(np.isin(splits, ["train", "val"]))
    held = holdout_clusters(np.asarray(t.labels)[rows], fraction, holdout_seed)
    splits[rows] = np.where(held, "val", "train")
    path = out_dir / f"resplit-{fraction:g}.parquet"
    write_features(
        path,
        ids=t.ids,
        labels=t.labels,
        splits=splits.astype(str),
        embeddings=t.embeddings,
        paths=t.paths,
        metadata={**t.metadata, "holdout_fraction": str(fraction)},
    )
    print(f"held out {fraction:g}: {int(held.sum())} of {len(rows)} training items", file=sys.stderr)
    return replace(features, path=str(path), train_path=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glyphs", type=Path, help="a glyphs-retrieval root (test/gnd_*.pkl, train/<cluster>/)")
    p.add_argument("--landmarks", type=Path, help="folder with the authors' gl18_resnet101_*.pkl")
    p.add_argument("--dataset", default="roxford5k")
    p.add_argument("--fixtures", action="store_true", help="the tests' small pickles in the authors' formats")
    p.add_argument("--holdout-fraction", type=float, default=0.05)
    p.add_argument("--holdout-seed", type=int, default=0)
    p.add_argument("--n-val-queries", type=int, default=70)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k1", type=int, nargs="+", default=[40, 80, 160])
    p.add_argument("--features", type=Path, help="a run's test features table (splits database, query)")
    p.add_argument("--train", type=Path, help="its training table (splits train, val); default: --features")
    p.add_argument("--gnd", type=Path, help="the test ground truth (with --features)")
    p.add_argument(
        "--resplit",
        type=float,
        help="with --features: hold out this fraction of the training clusters instead of the table's "
        "(a copy of the table; SSR is not retrained)",
    )
    p.add_argument("--rows-out", type=Path, help="with --features: write each variant's val-vs-test table here")
    args = p.parse_args(argv)
    if args.features:
        n_db = len(read_gnd(args.gnd).imlist)
        feats = RetrievalFeatures(
            str(args.features),
            int(read_metadata(args.features)["dim"]),
            n_db,
            len(read_gnd(args.gnd).qimlist),
            str(args.train or args.features),
            str(args.gnd),
        )
        with tempfile.TemporaryDirectory() as tmp_dir:
            if args.resplit:
                feats = resplit(feats, args.resplit, args.holdout_seed, Path(tmp_dir))
            rows, spearman = compare_choices(feats, args.n_val_queries, args.seed, args.rows_out)
        print("\n## Choices of each validation and their test mAP medium (default grids)\n")
        print(markdown_table(rows, list(rows[1])))
        print("\n## Spearman correlation of validation and test mAP over each method's grid\n")
        print(markdown_table(spearman, list(spearman[0])))
        return 0
    sets: list[tuple] = []
    if args.glyphs:
        gnd, n_db, clusters, paths = glyph_inputs(args.glyphs)
        sets.append(("glyphs", gnd, n_db, clusters, (args.glyphs, paths)))
    if args.landmarks:
        sets.append((f"{args.dataset} + SfM-120k", *landmark_inputs(args.landmarks, args.dataset), None))
    if args.fixtures:
        from tests.landmark_pickles import write_sfm_pickle, write_test_pickle

        tmp = Path(tempfile.mkdtemp())
        write_test_pickle(tmp)
        write_sfm_pickle(tmp)
        sets.append(("test fixtures (roxford5k + SfM-120k formats)", *landmark_inputs(tmp, "roxford5k"), None))
    if not sets:
        p.error("give --glyphs, --landmarks or --fixtures")
    for name, gnd, n_db, clusters, grader in sets:
        rows = [
            pr.row(args.k1, scale)
            for pr, scale in profiles(
                gnd, n_db, clusters, args.holdout_fraction, args.holdout_seed, args.n_val_queries, args.seed, grader
            )
        ]
        print(
            f"\n## {name} (holdout {args.holdout_fraction:g}, seed {args.holdout_seed}, "
            f"{args.n_val_queries} validation queries)\n"
        )
        print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
