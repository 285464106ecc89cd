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

With a run's features table (``retrieval-features-*.parquet``: splits database, query, train,
val) and the test ground truth, it also makes the baselines' choices under both protocols
and scores every grid point on the test queries (medium mAP), so the two choices compare
on the same features and code:

    python benchmarks/bench_validation_protocol.py --features TABLE --gnd GND [--train TABLE]

The measured table is in docs/validation.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssr_model.baselines import RETRIEVAL_METHODS  # noqa: E402
from ssr_model.metrics import revisited_map  # noqa: E402
from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams  # noqa: E402
from ssr_tasks.retrieval.handoffs import RetrievalFeatures  # noqa: E402
from ssr_tasks.retrieval.settings import ProtocolProfile, mirrored_database_size, protocol_profile  # noqa: E402
from ssr_tasks.retrieval.train import load_validation  # noqa: E402
from ssr_tasks.retrieval.validation import (  # noqa: E402
    choose_on_validation,
    grid_scale,
    markdown_table,
    mirror_validation,
    read_test_set,
    score_on_test,
)
from storage.features import read_metadata  # noqa: E402
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
) -> list[tuple[ProtocolProfile, float]]:
    """(profile, k1 scale) of the test, the held-out validation and the mirrored validation."""
    test = protocol_profile("test", test_gnd, n_test_db)
    held = holdout_clusters(clusters, holdout_fraction, holdout_seed)
    val_labels, n_train = np.asarray(clusters)[held], int((~held).sum())
    _, db, gt = validation_ground_truth(val_labels, n_val_queries, seed)
    old = protocol_profile("validation, held-out (before)", gt.gnd, len(db))
    _, db, gt = validation_ground_truth(val_labels, n_val_queries, seed, spread=True)
    spread = protocol_profile("validation", gt.gnd, len(db))
    size = mirrored_database_size(spread.positives, len(db), len(db) + n_train, test)
    new = protocol_profile("validation, mirror-test (after)", gt.gnd, size)
    return [(test, 1.0), (old, 1.0), (new, size / n_test_db)]


def glyph_inputs(root: Path) -> tuple[list[dict], int, np.ndarray]:
    gt = read_gnd(next((root / "test").glob("gnd_*.pkl")))
    train = list_split(root, "train")
    return gt.gnd, len(gt.imlist), np.asarray([train.classes[c] for c in train.labels])


def landmark_inputs(data_root: Path, dataset: str) -> tuple[list[dict], int, np.ndarray]:
    test = read_landmark_pickle(landmark_pickle(data_root, dataset))
    sfm = read_landmark_pickle(landmark_pickle(data_root, "sfm120k"))
    assert sfm.cluster is not None
    return test.gt.gnd, len(test.database), np.asarray(sfm.cluster)


def compare_choices(features: RetrievalFeatures, n_val_queries: int, seed: int) -> list[dict]:
    """Per method: the point each protocol chooses and its test mAP (medium), the best test mAP of
    the grid, and plain features' test mAP. Default grids (``RetrievalBaselineParams()``)."""
    baselines = RetrievalBaselineParams()
    q, db = read_test_set(features)
    test_map = dict(score_on_test(q, db, read_gnd(Path(features.gnd or "")).gnd, baselines))
    chosen: dict[str, dict[str, str]] = {}
    for protocol in ("held-out", "mirror-test"):
        train = mirror_validation(
            RetrievalTrainParams(n_val_queries=n_val_queries, seed=seed, val_protocol=protocol), features
        )
        val = load_validation(
            Path(features.train_path),
            n_val_queries,
            seed,
            features.dim,
            n_database=train.val_database,
            spread=protocol == "mirror-test",
        )
        choice, _ = choose_on_validation(val, baselines, grid_scale(train, len(val.database), features.n_database))
        print(f"{protocol}: {len(val.queries)} queries, {len(val.database)} database items", file=sys.stderr)
        labels = {f"{m} n={n}" for m, n in choice.qe_n} | {f"{m} {p.label()}" for m, p in choice.shortlist}
        if choice.krecip is not None:
            labels.add(f"k-reciprocal {choice.krecip.label()}")
        chosen[protocol] = {label.split(" ", 1)[0]: label for label in labels}
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    plain = revisited_map(np.argsort(-(qn @ dn.T), axis=1, kind="stable"), read_gnd(Path(features.gnd or "")).gnd)
    rows = [{"method": "features (no setting)", "its test mAP": round(plain["medium"]["map"], 2)}]
    for method in sorted(chosen["held-out"], key=RETRIEVAL_METHODS.index):
        old, new = chosen["held-out"][method], chosen["mirror-test"][method]
        rows.append(
            {
                "method": method,
                "held-out picks": old.split(" ", 1)[1],
                "its test mAP": round(test_map[old], 2),
                "mirror-test picks": new.split(" ", 1)[1],
                "its test mAP ": round(test_map[new], 2),
                "best test mAP of the grid": round(
                    max(v for k, v in test_map.items() if k.split(" ", 1)[0] == method), 2
                ),
            }
        )
    return rows


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
        rows = compare_choices(feats, args.n_val_queries, args.seed)
        print("\n## Choices of each protocol and their test mAP medium (default grids)\n")
        print(markdown_table(rows, list(rows[1])))
        return 0
    sets = []
    if args.glyphs:
        sets.append(("glyphs", *glyph_inputs(args.glyphs)))
    if args.landmarks:
        sets.append((f"{args.dataset} + SfM-120k", *landmark_inputs(args.landmarks, args.dataset)))
    if args.fixtures:
        from tests.landmark_pickles import write_sfm_pickle, write_test_pickle

        tmp = Path(tempfile.mkdtemp())
        write_test_pickle(tmp)
        write_sfm_pickle(tmp)
        sets.append(("test fixtures (roxford5k + SfM-120k formats)", *landmark_inputs(tmp, "roxford5k")))
    if not sets:
        p.error("give --glyphs, --landmarks or --fixtures")
    for name, gnd, n_db, clusters in sets:
        rows = [
            pr.row(args.k1, scale)
            for pr, scale in profiles(
                gnd, n_db, clusters, args.holdout_fraction, args.holdout_seed, args.n_val_queries, args.seed
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
