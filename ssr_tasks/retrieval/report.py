"""The retrieval results: revisited mAP per method with and without SSR, the table and plots
on disk (a Prefect task), then MLflow tracking and the registered model (plain code run in
the flow, inside its open MLflow run)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task

from ssr_model.metrics import revisited_map
from ssr_model.packaged import RetrievalReranker
from ssr_tasks import reporting
from ssr_tasks.config import RetrievalParams
from ssr_tasks.handoffs import RegisteredModel
from ssr_tasks.reporting import ResultsReport
from ssr_tasks.retrieval.evaluate import BaselineChoice, map_row, ranks_after_rerank
from ssr_tasks.retrieval.handoffs import Rankings, Reranked, RetrievalData, RetrievalTrials
from ssr_tasks.tracking import Tracker
from storage.landmark_tables import BACKBONE as LANDMARK_BACKBONE
from storage.landmarks import RevisitedGroundTruth, read_gnd

log = logging.getLogger(__name__)

MODEL_DESCRIPTION = (
    "SSR re-ranker of retrieval neighbour lists (RetrievalSSR). mlflow.pyfunc: "
    '{"query": float32 (B, D), "neighbours": float32 (B, k, D)} -> re-ranked positions (B, k), best first; '
    "mlflow.pytorch.load_model gives the nn.Module (rerank). Each version's description is its results table."
)
COLUMNS = ["method", "mAP easy", "mAP medium", "mAP hard", "mP@10 medium", "mP@10 hard"]
# Ground truth from label matches has no hard or junk items: Easy = Medium and Hard is empty,
# so the table has one mAP and one mP@10 (the medium protocol's, which equal the easy one's).
LABEL_COLUMNS = ["method", "mAP", "mP@10"]
NOT_IMPROVED = "SSR did not improve on validation; its rows equal the inputs."


def labels_only(gnd: Sequence[Mapping]) -> bool:
    """Whether a ground truth is plain label matches (no hard, no junk items anywhere)."""
    return all(len(g.get("hard", ())) == 0 and len(g.get("junk", ())) == 0 for g in gnd)


def ssr_improved(trials: RetrievalTrials) -> bool:
    """False when validation chose the untrained model (iteration 0) of the best trial."""
    return trials.best.best_iteration > 0


@task(name="report-retrieval")
def write_report(
    params: RetrievalParams,
    data: RetrievalData,
    rankings: Rankings,
    reranked: Sequence[Reranked],
    out_dir: str,
    improved: bool = True,
) -> ResultsReport:
    """mAP of each method's initial ranking and after SSR; the table, a bar plot and an example query.

    improved: False when validation chose the untrained SSR (the table says so in one sentence)."""
    gt = read_gnd(Path(data.gnd))
    with np.load(rankings.ranks) as arrays:
        initial = {name: arrays[name] for name in arrays.files}
    rows, after = [], {}
    for r in reranked:
        after[r.name] = ranks_after_rerank(Path(r.store), initial[r.name])
        rows.append(map_row(r.name, initial[r.name], gt.gnd))
        rows.append(map_row(f"{r.name} + SSR", after[r.name], gt.gnd))
        log.info(
            "mAP %s: M %.2f H %.2f -> + SSR: M %.2f H %.2f",
            r.name,
            rows[-2]["mAP medium"],
            rows[-2]["mAP hard"],
            rows[-1]["mAP medium"],
            rows[-1]["mAP hard"],
        )
    first = reranked[0].name
    figures = {"map_by_method.png": reporting.plot_map_by_method(rows)}
    if data.images is not None:  # published features come without their images
        try:
            figures["reranked_example.png"] = example_figure(
                gt, Path(data.images), initial[first], after[first], name=first
            )
        except FileNotFoundError as exc:  # a user's path column naming files that are not there
            log.warning("reranked example: no figure, %s", exc)
    notes = []
    columns = COLUMNS
    if labels_only(gt.gnd):
        columns = LABEL_COLUMNS
        rows = [{**r, "mAP": r["mAP medium"], "mP@10": r["mP@10 medium"]} for r in rows]
        notes.append(
            "Ground truth: label matches (a database item is positive when its label equals the query's), "
            "so there is one mAP and one mP@10."
        )
    if not improved:
        log.warning(NOT_IMPROVED)
        notes.append(NOT_IMPROVED)
    return reporting.write_report(rows, columns, figures, Path(out_dir), notes)


def example_figure(
    gt: RevisitedGroundTruth,
    images: Path,
    initial: np.ndarray,
    reranked: np.ndarray,
    top: int = 8,
    name: str = "features",
):
    """Query whose medium AP SSR improved most: top results before and after, framed by ground truth.

    initial / reranked: (Q, N) database indices, best first; name: the method (the first row, which
    ``methods`` may make another than features).
    """
    gnd = gt.gnd
    gains = []
    for q in range(len(gnd)):
        if len(gnd[q]["easy"]) + len(gnd[q]["hard"]) == 0:
            gains.append(-np.inf)
            continue
        before = revisited_map(initial[q : q + 1], gnd[q : q + 1])["medium"]["map"]
        after = revisited_map(reranked[q : q + 1], gnd[q : q + 1])["medium"]["map"]
        gains.append(after - before)
    q = int(np.argmax(gains))

    def load(name: str) -> np.ndarray:
        # the glyphs name images without their extension; a user's path column gives the file itself
        for path in (images / name, images / f"{name}.png", images / f"{name}.jpg"):
            if path.is_file():
                return np.asarray(Image.open(path).convert("RGB"))
        raise FileNotFoundError(f"{images / name}: image of the example query or its results not found")

    query = load(gt.qimlist[q])

    def item(i: int) -> np.ndarray:  # distractors (rows after the ground truth's imlist) have no image file
        return load(gt.imlist[i]) if i < len(gt.imlist) else np.zeros_like(query)

    rows = {
        label: [(item(int(i)), reporting.gt_label(gnd[q], int(i))) for i in ranks[q, :top]]
        for label, ranks in ((name, initial), (f"{name} + SSR", reranked))
    }
    return reporting.plot_reranked_example(
        query, rows, f"query {gt.qimlist[q]}: medium AP {gains[q]:+.1f} points with SSR"
    )


def chosen_settings(trials: RetrievalTrials, choice: BaselineChoice) -> dict[str, str]:
    """What validation chose: lr_dni, the checkpoint, QE's n per QE method, the k-reciprocal point."""
    best = trials.best
    return {
        "chosen.trial": best.label,
        "chosen.lr_dni": f"{best.lr_dni:g}",
        "chosen.checkpoint_iteration": str(best.best_iteration),
        **choice.as_params(),
    }


def describe_choice(trials: RetrievalTrials, choice: BaselineChoice) -> str:
    """The chosen settings in one line (the report's Markdown, the flow's log)."""
    return ", ".join(f"{k.removeprefix('chosen.')} {v}" for k, v in chosen_settings(trials, choice).items())


def log_and_register(
    tracker: Tracker,
    params: RetrievalParams,
    trials: RetrievalTrials,
    choice: BaselineChoice,
    report: ResultsReport,
    tags: Mapping[str, str],
) -> RegisteredModel:
    """Into the open parent run: a nested run per trial, the settings chosen on validation
    (params ``chosen.*``, and the validation mAP of every baseline setting tried), mAP
    metrics, table, plots, and the registered re-ranker, aliased ``champion`` when it wins
    on validation."""
    for trial in trials.trials:
        with tracker.trial_run(f"trial {trial.label}", trial.label, tags) as live:
            if not live:  # a live run has its point's parameters already
                tracker.log_params(trial.config.model_dump())
            for h in trial.history if not live else ():  # a live run has its curves already
                tracker.log_metrics({"val_map": 100 * h.val_map}, step=h.iteration)
            tracker.log_metrics({"best_val_map": 100 * trial.best_val, "best_iteration": trial.best_iteration})
    tracker.log_params(chosen_settings(trials, choice))
    tracker.log_metrics({f"val_map {setting}": value for setting, value in choice.val_map})
    for r in report.rows:
        key = r["method"].replace(" + ", "_plus_").replace(" ", "_")
        tracker.log_metrics({f"{key}_map_{p}": r[f"mAP {p}"] for p in ("easy", "medium", "hard")})
    improved = ssr_improved(trials)
    tracker.set_tags({"ssr.improved": str(improved).lower()})
    if not improved:
        tracker.set_tags({"ssr.note": NOT_IMPROVED})
    tracker.log_file(Path(report.csv), "results")
    tracker.log_file(Path(report.md), "results")
    for _, path in report.figures:
        tracker.log_file(Path(path), "plots")
    best = trials.best
    dataset = params.data.dataset
    backbone = params.backbone.name if dataset == "glyphs-retrieval" else LANDMARK_BACKBONE
    return tracker.log_and_register(
        RetrievalReranker(best.model.build()),
        params.model_name,
        tags={
            "dataset": dataset,
            "backbone": backbone,
            "steps": str(best.config.steps),
            "k": str(best.config.k),
            "val_metric_name": "val_map",
        },
        val_metric=100 * best.best_val,
        description=f"{dataset}: revisited mAP (%)\n\n{report.markdown}",
        promote=improved,
        model_description=MODEL_DESCRIPTION,
    )
