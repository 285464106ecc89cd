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
from ssr_tasks.retrieval.costs import plus_ssr
from ssr_tasks.retrieval.evaluate import BaselineChoice, map_row, ranks_after_rerank, read_ranks
from ssr_tasks.retrieval.handoffs import Rankings, Reranked, RetrievalCost, RetrievalData, RetrievalTrials
from ssr_tasks.retrieval.validation import read_val_vs_test, write_val_vs_test
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
COSTS_CSV = "costs.csv"  # numeric costs per row (the table shows the peak as text, "< 1 MiB" below 1)
VAL_VS_TEST_CSV = "val_vs_test.csv"


def cost_columns(n_queries: int) -> list[str]:
    """The cost columns: ms per query, the peak MiB of one call on all ``n_queries`` queries, its CPU seconds."""
    return ["ms/query", f"peak MiB (Q={n_queries})", "CPU s"]


def cost_cells(cost: RetrievalCost) -> dict:
    ms, peak, cpu = cost_columns(cost.n_queries)
    return {
        ms: float(f"{cost.ms_per_query:.3g}"),
        peak: reporting.fmt_peak_mib(cost.peak_mib),
        cpu: round(cost.cpu_seconds, 3),
    }


def row_costs(rankings: Rankings, reranked: Sequence[Reranked]) -> dict[str, RetrievalCost]:
    """The cost of every row: each method's ranking call, and "<method> + SSR" = that call then SSR's."""
    out = {c.name: c for c in rankings.costs}
    ssr = {c.name: c for r in reranked for c in r.ssr_costs}
    for r in reranked:
        if r.name in out:
            both = plus_ssr(out[r.name], ssr.get(f"{r.name} + SSR"))
            if both is not None:
                out[both.name] = both
    return out


def plot_map_vs_cost(rows: Sequence[Mapping], costs: Mapping[str, RetrievalCost]):
    """mAP medium against ms per query (log x) of every row with a measured cost; "+ SSR" rows
    hollow, in their method's colour, joined to it by a line."""
    plt = reporting._plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.get_cmap("tab10")
    bases = [r["method"] for r in rows if not r["method"].endswith(" + SSR") and r["method"] in costs]
    by_name = {r["method"]: r for r in rows}
    for i, name in enumerate(bases):
        colour = colours(i % 10)
        x0, y0 = costs[name].ms_per_query, by_name[name]["mAP medium"]
        ax.plot([x0], [y0], "o", color=colour, label=name)
        plus = f"{name} + SSR"
        if plus in costs and plus in by_name:
            x1, y1 = costs[plus].ms_per_query, by_name[plus]["mAP medium"]
            ax.plot([x0, x1], [y0, y1], "-", color=colour, lw=0.8)
            ax.plot([x1], [y1], "o", mfc="none", color=colour)
    ax.plot([], [], "o", mfc="none", color="grey", label="+ SSR")
    ax.set_xscale("log")
    ax.tick_params(axis="x", which="minor", labelbottom=False)  # minor labels overlap on a narrow range
    ax.set_xlabel("ms per query (one call on all test queries, in a Ray actor; log scale)")
    ax.set_ylabel("mAP medium (%)")
    ax.set_title("Accuracy against cost per retrieval method", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def write_costs(costs: Mapping[str, RetrievalCost], path: Path) -> Path:
    """The measured costs as CSV (method, ms_per_query, peak_mib, cpu_seconds, n_queries), atomically."""
    lines = ["method,ms_per_query,peak_mib,cpu_seconds,n_queries"]
    lines += [
        f"{c.name},{c.ms_per_query:.6g},{c.peak_mib:.6g},{c.cpu_seconds:.6g},{c.n_queries}" for c in costs.values()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def read_costs(path: Path) -> list[dict]:
    """The rows of a costs.csv, numbers as floats."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        name, ms, peak, cpu, n = line.rsplit(",", 4)
        out.append({"method": name, "ms_per_query": float(ms), "peak_mib": float(peak), "cpu_seconds": float(cpu)})
    return out


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
    rows = []
    first = reranked[0].name
    example: tuple[np.ndarray, np.ndarray] | None = None
    for r in reranked:  # one method's (Q, N) rankings at a time, memory-mapped
        initial = read_ranks(rankings.ranks, r.name)
        after = ranks_after_rerank(Path(r.store), initial)
        rows.append(map_row(r.name, initial, gt.gnd))
        rows.append(map_row(f"{r.name} + SSR", after, gt.gnd))
        if r.name == first and data.images is not None:
            example = np.array(initial), after
        del initial, after
        log.info(
            "mAP %s: M %.2f H %.2f -> + SSR: M %.2f H %.2f",
            r.name,
            rows[-2]["mAP medium"],
            rows[-2]["mAP hard"],
            rows[-1]["mAP medium"],
            rows[-1]["mAP hard"],
        )
    costs = row_costs(rankings, reranked)
    for row in rows:
        if row["method"] in costs:
            row.update(cost_cells(costs[row["method"]]))
    figures = {"map_by_method.png": reporting.plot_map_by_method(rows)}
    if costs:
        figures["map_vs_cost.png"] = plot_map_vs_cost(rows, costs)
        write_costs(costs, Path(out_dir) / COSTS_CSV)
    if rankings.val_vs_test is not None:  # the table beside results.csv (its Markdown keeps the note)
        src = Path(rankings.val_vs_test)
        note = src.with_suffix(".md").read_text().split("\n\n")[1] if src.with_suffix(".md").is_file() else ""
        write_val_vs_test(read_val_vs_test(src), Path(out_dir) / VAL_VS_TEST_CSV, note)
    if data.images is not None and example is not None:  # published features come without their images
        try:
            figures["reranked_example.png"] = example_figure(gt, Path(data.images), *example, name=first)
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
    if costs:
        columns = columns + cost_columns(next(iter(costs.values())).n_queries)
        notes.append(
            "Costs: one call of each method on all test queries in a Ray actor with one CPU thread (ms per query, "
            "its peak memory, its CPU seconds); a '+ SSR' row adds SSR's re-ranking of the method's top-k."
        )
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
    results_dir = Path(report.csv).parent
    if (results_dir / COSTS_CSV).is_file():
        for c in read_costs(results_dir / COSTS_CSV):
            key = c["method"].replace(" + ", "_plus_").replace(" ", "_")
            tracker.log_metrics(
                {f"{key}_ms_per_query": c["ms_per_query"], f"{key}_cpu_seconds": c["cpu_seconds"]}
                | ({} if np.isnan(c["peak_mib"]) else {f"{key}_peak_mib": c["peak_mib"]})
            )
        tracker.log_file(results_dir / COSTS_CSV, "results")
    for name in (VAL_VS_TEST_CSV, Path(VAL_VS_TEST_CSV).with_suffix(".md").name):
        if (results_dir / name).is_file():
            tracker.log_file(results_dir / name, "results")
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
