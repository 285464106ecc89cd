"""Validation that mirrors the test set (issue 20 item 6), plain code.

The held-out clusters of the training data pick every setting (QE's n, the k-reciprocal
point, each shortlist re-ranker's point, SSR's checkpoint and lr_dni). Before this module
they formed a validation set unlike the test: on the built-in glyphs 70 queries against
about 120 database items, 4 positives per query, so a k1 of 160 covered the whole
database while on the test (5,000 items, 18 positives per query) it covers 3%
(docs/validation.md has the measured table). Under ``val_protocol: mirror-test``:

- queries are spread over the held-out clusters, one per cluster before any second;
- the database is padded with items of training clusters (negatives of every query) until
  positives per database item equal the test's (``settings.mirrored_database_size``);
- every neighbour count of the baselines' grids (k-reciprocal k1/k2, diffusion k, GNN
  k1/k2, SuperGlobal K) is scaled by (validation database) / (test database) on validation,
  so a point covers the same share of either database; the point chosen maps back to the
  test grid's point at the same position (the first of several that round to the same one);
- with ``baselines.val_scale_qe`` QE's n and alpha-DBA-QE's n_qe / n_dba are scaled by the
  positives per query (validation / test); off by default, it picked no better point on the
  glyphs (docs/validation.md);
- ``glyph_grader`` / ``graded_validation`` label held-out glyph items easy / hard / junk by the
  glyph test's rule (rendering parameters recomputed from the seed); medium-protocol choices
  do not change, since training renderings are never junk.

``val_vs_test_rows`` puts each grid point's validation mAP beside its test mAP (medium
protocol, the one choices are made on). The test side is for judging the validation only.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import rankdata

from ssr_model.baselines import KReciprocalPoint, ShortlistPoint, krecip_grid
from ssr_tasks.config import RetrievalBaselineParams, RetrievalTrainParams
from ssr_tasks.retrieval.evaluate import QE_METHODS, BaselineChoice, choose_baselines, shortlist_points
from ssr_tasks.retrieval.handoffs import RetrievalFeatures
from ssr_tasks.retrieval.settings import (
    ProtocolProfile,
    mirrored_database_size,
    positives_scale,
    protocol_profile,
    scaled_krecip,
    scaled_qe_n,
    scaled_shortlist,
)
from ssr_tasks.retrieval.train import ValidationSet
from storage.features import read_features
from storage.glyphs.dataset import retrieval_training_renderings
from storage.glyphs.fonts import family_of
from storage.glyphs.retrieval import label_for
from storage.landmark_tables import validation_ground_truth
from storage.landmarks import read_gnd

log = logging.getLogger(__name__)


def test_set_profile(features: RetrievalFeatures) -> ProtocolProfile | None:
    """The test set's profile (None when the features carry no ground truth path)."""
    if features.gnd is None:
        return None
    return protocol_profile("test", read_gnd(Path(features.gnd)).gnd, features.n_database)


def _split_labels(table: Path) -> tuple[np.ndarray, int]:
    """(labels of split 'val', number of rows of split 'train'), reading two columns only."""
    t = pq.read_table(table, columns=["label", "split"])
    splits = t.column("split").to_numpy(zero_copy_only=False)
    labels = t.column("label").to_numpy(zero_copy_only=False)
    return np.asarray(labels[splits == "val"]), int((splits == "train").sum())


def validation_profile(
    train: RetrievalTrainParams, train_table: Path, n_database: int | None = None
) -> ProtocolProfile:
    """The profile of the validation set ``train`` draws from ``train_table`` (held-out queries,
    positives, and the database: ``n_database`` when given, else the held-out items only)."""
    labels, _ = _split_labels(train_table)
    spread = train.val_protocol == "mirror-test"
    _, db_rows, gt = validation_ground_truth(labels, train.n_val_queries, train.seed, spread=spread)
    name = "validation (mirror-test)" if spread else "validation (held-out)"
    return protocol_profile(name, gt.gnd, n_database or len(db_rows))


def mirror_validation(train: RetrievalTrainParams, features: RetrievalFeatures) -> RetrievalTrainParams:
    """``train`` with ``val_database`` set from the test set under ``mirror-test`` (positives per
    database item as the test's); unchanged under ``held-out``, when set, or without a test ground truth."""
    test = test_set_profile(features)
    if train.val_protocol != "mirror-test" or train.val_database or test is None:
        return train
    labels, n_train = _split_labels(Path(features.train_path))
    _, db_rows, gt = validation_ground_truth(labels, train.n_val_queries, train.seed, spread=True)
    val = protocol_profile("validation", gt.gnd, len(db_rows))
    size = mirrored_database_size(val.positives, len(db_rows), len(db_rows) + n_train, test)
    log.info(
        "validation mirrors the test: %d database items (%d held-out + %d from training clusters) for %.1f positives "
        "per query, as the test's %d items for %.1f",
        size,
        len(db_rows),
        size - len(db_rows),
        val.positives,
        test.n_database,
        test.positives,
    )
    return train.model_copy(update={"val_database": size})


def grid_scale(train: RetrievalTrainParams, n_val_database: int, n_test_database: int) -> float:
    """The factor of the neighbour counts on validation: the database sizes' ratio under mirror-test, else 1."""
    if train.val_protocol != "mirror-test" or n_test_database <= 0:
        return 1.0
    return n_val_database / n_test_database


QE_NAMES = tuple(name for name, _ in QE_METHODS)


@dataclass(frozen=True)
class Grids:
    """The test grids (as the baselines group gives them) and their scaled validation twins, same order.

    ``scale`` multiplies the neighbour counts (database sizes' ratio), ``qe_scale`` QE's n and
    alpha-DBA-QE's n_qe / n_dba (positives per query's ratio, ``settings.scaled_qe_n``).
    Rounding can send several test points to one validation point (n = 1, 3, 5, 7 all become
    n = 1 at a scale of 0.18): validation tries each distinct point once, and a validation point
    chosen stands for the first of them in grid order (``to_test``). Measured on the glyph demo's
    features, the other rule tried (the test point whose exact scaled values are nearest) lost:
    SuperGlobal K=6 instead of K=3 (test mAP 30.79 against 31.78), AQE n=5 instead of n=1
    (30.25 against 30.84); docs/validation.md."""

    qe_n: tuple[int, ...]
    krecip: tuple[KReciprocalPoint, ...]
    shortlist: Mapping[str, Sequence[ShortlistPoint]]
    val_krecip: tuple[KReciprocalPoint, ...]
    val_shortlist: Mapping[str, Sequence[ShortlistPoint]]
    val_qe_n: tuple[int, ...] = ()  # empty: as qe_n
    scale: float = 1.0
    qe_scale: float = 1.0

    @classmethod
    def of(cls, baselines: RetrievalBaselineParams, scale: float, qe_scale: float | None = None) -> Grids:
        """qe_scale: None takes ``scale`` when ``baselines.val_scale_qe`` (under mirror-test the
        database is padded to the test's positives per item, so both ratios agree unless the
        padding was capped), else 1 (QE's n as given: the default, see docs/validation.md)."""
        qs = (scale if baselines.val_scale_qe else 1.0) if qe_scale is None else qe_scale
        kr = krecip_grid(baselines.krecip_pairs, baselines.krecip_lambda)
        sl = shortlist_points(baselines)
        qe = tuple(baselines.qe_n_grid)
        return cls(
            qe,
            tuple(kr),
            sl,
            tuple(scaled_krecip(kr, scale)),
            scaled_shortlist(sl, scale, qs),
            tuple(scaled_qe_n(n, qs) for n in qe),
            scale,
            qs,
        )

    def points(self, method: str) -> list[tuple[Point, Point]]:
        """(test point, validation point) of ``method``, in grid order."""
        if method in QE_NAMES:
            return list(zip(self.qe_n, self.val_qe_n or self.qe_n))
        if method == "k-reciprocal":
            return list(zip(self.krecip, self.val_krecip))
        return list(zip(self.shortlist[method], self.val_shortlist[method]))

    def methods(self) -> list[str]:
        return [*QE_NAMES, "k-reciprocal", *self.shortlist]

    def distinct_val(self, method: str) -> list:
        """The validation points of ``method`` without repeats, in grid order (what validation tries)."""
        return list(dict.fromkeys(v for _, v in self.points(method)))

    def to_test(self, method: str, val_point: Point) -> Point:
        """The test point a chosen validation point stands for: the first in grid order of the test
        points that scale to it (for ascending grids the smallest count: validation cannot tell them
        apart, so the one that moves the initial ranking least)."""
        for t, v in self.points(method):
            if v == val_point:
                return t
        raise ValueError(f"{method}: {_label(val_point)} is not a point of the scaled validation grid")

    def label_pairs(self) -> dict[str, list[tuple[str, str]]]:
        """Per method: (validation label, test label) of each point, in grid order."""
        return {m: [(_label(v), _label(t)) for t, v in self.points(m)] for m in self.methods()}


Point = int | KReciprocalPoint | ShortlistPoint


def _label(p: Point) -> str:
    return f"n={p}" if isinstance(p, (int, np.integer)) else p.label()


def to_test_grid(choice: BaselineChoice, grids: Grids) -> BaselineChoice:
    """A choice made on the scaled validation grids, as points of the test grids (``Grids.to_test``);
    its ``val_map`` labelled by the test points, each test point with the score of its validation
    point (test points that share a validation point share its score)."""
    qe_n = tuple((m, int(grids.to_test(m, n))) for m, n in choice.qe_n)  # type: ignore[arg-type]  # QE points are ints
    krecip = None if choice.krecip is None else grids.to_test("k-reciprocal", choice.krecip)
    shortlist = tuple((m, grids.to_test(m, p)) for m, p in choice.shortlist)
    pairs = grids.label_pairs()
    scores = dict(choice.val_map)
    val_map: list[tuple[str, float]] = []
    done: set[str] = set()
    for label, score in choice.val_map:
        method = next((m for m in pairs if label.startswith(f"{m} ")), None)
        if method is None:
            val_map.append((label, score))
            continue
        if method in done:
            continue
        done.add(method)
        val_map += [(f"{method} {t}", scores[f"{method} {v}"]) for v, t in pairs[method] if f"{method} {v}" in scores]
    return replace(choice, qe_n=qe_n, krecip=krecip, shortlist=shortlist, val_map=tuple(val_map))  # type: ignore[arg-type]


def choose_on_validation(
    val: ValidationSet, baselines: RetrievalBaselineParams, scale: float, *, qe_scale: float | None = None
) -> tuple[BaselineChoice, dict[str, str]]:
    """The baselines' settings chosen on ``val`` over the grids scaled by ``scale`` (neighbour counts)
    and ``qe_scale`` (QE's n, alpha-DBA-QE's n_qe / n_dba; None: ``Grids.of``'s default), as
    test-grid points; and the validation label of each test label (for the val-vs-test table).
    Each distinct validation point is tried once."""
    grids = Grids.of(baselines, scale, qe_scale)
    choice = choose_baselines(
        val,
        grids.distinct_val("AQE"),
        grids.distinct_val("k-reciprocal"),
        methods=baselines.methods,
        shortlist_points={m: grids.distinct_val(m) for m in grids.shortlist},
    )
    val_label = {f"{m} {t}": f"{m} {v}" for m, pairs in grids.label_pairs().items() for v, t in pairs}
    return to_test_grid(choice, grids), val_label


def qe_scale_for(train: RetrievalTrainParams, val: ValidationSet, test: ProtocolProfile | None) -> float:
    """The factor of QE's n on validation: validation positives per query (medium) over the test's
    under mirror-test; 1 under held-out or without a test ground truth."""
    if train.val_protocol != "mirror-test" or test is None:
        return 1.0
    return positives_scale(protocol_profile("validation", val.gnd, len(val.database)).positives, test.positives)


def score_on_test(
    query: np.ndarray,
    db: np.ndarray,
    gnd: list[dict],
    baselines: RetrievalBaselineParams,
    normalised: bool = False,
) -> tuple[tuple[str, float], ...]:
    """Test medium mAP of every grid point of the baselines group (``choose_baselines`` run on the
    test queries as if they were a validation set; its choice is discarded). query (Q, D), db (N, D);
    ``normalised``: db's rows are unit length already (a memory map is then used as it is, not copied)."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    d = db if normalised else db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    test = ValidationSet(q, d, np.argsort(-(q @ d.T), axis=1, kind="stable"), gnd)
    grids = Grids.of(baselines, 1.0)
    return choose_baselines(
        test,
        grids.qe_n,
        grids.krecip,
        methods=baselines.methods,
        shortlist_points={m: list(p) for m, p in grids.shortlist.items()},
    ).val_map


VAL_VS_TEST_COLUMNS = [
    "method",
    "test setting",
    "validation setting",
    "validation mAP medium",
    "test mAP medium",
    "chosen on validation",
    "best on test",
]


def val_vs_test_rows(
    choice: BaselineChoice, val_label: Mapping[str, str], test_map: Sequence[tuple[str, float]]
) -> list[dict]:
    """One row per grid point: its validation and test mAP (medium), whether validation chose it,
    whether it is the best of its method on the test. choice: as returned by ``choose_on_validation``."""
    chosen_labels = {f"{m} n={n}" for m, n in choice.qe_n}
    if choice.krecip is not None:
        chosen_labels.add(f"k-reciprocal {choice.krecip.label()}")
    chosen_labels |= {f"{m} {p.label()}" for m, p in choice.shortlist}
    val = dict(choice.val_map)
    methods = list(dict.fromkeys(label.split(" ", 1)[0] for label, _ in test_map))
    best = {m: max(s for label, s in test_map if label.split(" ", 1)[0] == m) for m in methods}
    rows = []
    for label, t in test_map:
        method, setting = label.split(" ", 1)
        v = val.get(label)
        rows.append(
            {
                "method": method,
                "test setting": setting,
                "validation setting": val_label.get(label, label).split(" ", 1)[1],
                "validation mAP medium": "" if v is None else round(v, 2),
                "test mAP medium": round(t, 2),
                "chosen on validation": "yes" if label in chosen_labels else "",
                "best on test": "yes" if t == best[method] else "",
            }
        )
    return rows


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation with tied values given their average rank (test points that
    share a validation point tie on validation); nan when either side is constant or has < 2 values."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def val_vs_test_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per method: the test mAP of the point validation chose, the best test mAP of the grid, the
    gap, and the rank correlation (Spearman) of validation and test mAP over the method's points."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["validation mAP medium"] != ""]
        if not mine:
            continue
        picked = next((r for r in mine if r["chosen on validation"]), None)
        best = max(r["test mAP medium"] for r in mine)
        out.append(
            {
                "method": method,
                "points": len(mine),
                "chosen": picked["test setting"] if picked else "",
                "its test mAP": picked["test mAP medium"] if picked else "",
                "best test mAP": best,
                "gap": round(best - picked["test mAP medium"], 2) if picked else "",
                "Spearman val/test": round(
                    _spearman([r["validation mAP medium"] for r in mine], [r["test mAP medium"] for r in mine]), 2
                ),
            }
        )
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
    Path(fh.name).replace(path)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return md + "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def write_val_vs_test(rows: Sequence[Mapping], csv_path: Path, note: str = "") -> Path:
    """The table as CSV at ``csv_path`` and as Markdown (per-method summary first) beside it (``.md``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=VAL_VS_TEST_COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in VAL_VS_TEST_COLUMNS})
    _atomic_write(csv_path, buf.getvalue())
    summary = val_vs_test_summary(rows)
    md = "# Validation against test, every grid point (mAP medium, %)\n\n"
    md += f"{note}\n\n" if note else ""
    if summary:
        md += markdown_table(summary, list(summary[0])) + "\n"
    md += markdown_table(rows, VAL_VS_TEST_COLUMNS)
    _atomic_write(csv_path.with_suffix(".md"), md)
    return csv_path


def read_val_vs_test(csv_path: Path) -> list[dict]:
    """The rows of a val_vs_test.csv (numbers as floats, empty cells as "")."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for c in ("validation mAP medium", "test mAP medium"):
            r[c] = float(r[c]) if r[c] != "" else ""
    return rows


def read_test_set(features: RetrievalFeatures) -> tuple[np.ndarray, np.ndarray]:
    """The test set's (query (Q, D), database (N, D)) features as extracted."""
    q = read_features(Path(features.path), split="query").embeddings
    db = read_features(Path(features.path), split="database", expected_dim=q.shape[1]).embeddings
    return q, db


def glyph_grader(retrieval_root: Path, paths: Sequence[str]) -> Callable[[int, np.ndarray], list[str | None]]:
    """The glyph test's ground-truth rule (``storage.glyphs.retrieval.label_for``) over held-out
    training renderings, for ``validation_ground_truth(..., grade=)``.

    paths: the held-out rows' image paths (``train/U+0041/U+0041_03.png``, as the features table
    stores them, or relative to ``train/``), in the order of the labels given to
    ``validation_ground_truth``. Each rendering's font and augmentation are recomputed from the
    dataset's seed (``retrieval_training_renderings``, checked against the files). The rule then
    says, per query and item of its cluster: easy (font of the query's family, mild transform,
    under 10 % of the ink occluded), hard (another family, stronger transform or light
    occlusion) or junk (40 % of the ink occluded or rotated 45 deg). The training renderings are
    all mild and never occluded, so a validation item is easy or hard by font family only, and
    never junk."""
    rel = [p.removeprefix("train/") for p in paths]
    for p, r in zip(paths, rel):
        if r.count("/") != 1 or not r.startswith("U+"):
            raise ValueError(f"glyph grader: path {p!r}; expected train/U+XXXX/U+XXXX_NN.png (a glyph training image)")
    meta = retrieval_training_renderings(retrieval_root, {p.split("/")[0] for p in rel})
    items = [meta[p] for p in rel]

    def grade(query: int, rows: np.ndarray) -> list[str | None]:
        return [label_for(items[query], items[int(r)], family_of) for r in rows]

    return grade


def graded_validation(
    val: ValidationSet,
    train_table: Path,
    retrieval_root: Path,
    n_queries: int,
    seed: int,
    spread: bool,
) -> ValidationSet:
    """``val`` (drawn by ``load_validation`` with the same n_queries, seed, spread) with its ground truth
    graded easy / hard / junk by the glyph test's rule (``glyph_grader``). The held-out items come
    first in its database, so the indices are unchanged; only the split of each query's positives
    into easy and hard changes (their union is checked), and with it the easy and hard protocols.
    The medium protocol, on which every choice is made, scores the same."""
    t = pq.read_table(train_table, columns=["split", "path"])
    splits = t.column("split").to_numpy(zero_copy_only=False)
    labels, _ = _split_labels(train_table)
    paths = [p for p, s in zip(t.column("path").to_pylist(), splits) if s == "val"]
    _, _, gt = validation_ground_truth(
        labels, n_queries, seed, spread=spread, grade=glyph_grader(Path(retrieval_root), paths)
    )
    if len(gt.gnd) != len(val.gnd) or any(
        sorted(np.concatenate([g[k] for k in ("easy", "hard", "junk")]).tolist())
        != sorted(np.asarray(v["easy"]).tolist())
        for g, v in zip(gt.gnd, val.gnd)
    ):
        raise ValueError(
            f"{train_table}: the graded validation set does not match the one given "
            "(draw it with the same n_queries, seed and spread)"
        )
    return replace(val, gnd=gt.gnd)
