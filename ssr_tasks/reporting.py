"""Results tables and plots (matplotlib, Agg backend) built from evaluation outputs, for both tracks."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssr_model.baselines import peer_method
from ssr_model.baselines.peers import COMPOSED_METHODS
from ssr_model.metrics import accuracy_ci95


@dataclass(frozen=True)
class ResultsReport:
    """A results table (rows = method, one column per metric) as written to disk, and the plots.

    csv / md: the table's files; markdown: the table's text; figures: plot name -> PNG path.
    """

    rows: tuple[dict, ...]
    markdown: str
    csv: str
    md: str
    figures: tuple[tuple[str, str], ...]


def write_report(
    rows: list[dict], columns: list[str], figures: Mapping[str, Any], out_dir: Path, notes: Sequence[str] = ()
) -> ResultsReport:
    """Write the table (CSV + Markdown) and each matplotlib figure (name -> figure) into
    ``out_dir``; ``notes``: sentences printed under the Markdown table."""
    csv_path, md_path, md = write_results_table(rows, columns, out_dir, notes)
    paths = tuple((name, str(save_figure(fig, out_dir / name))) for name, fig in figures.items())
    return ResultsReport(tuple(rows), md, str(csv_path), str(md_path), paths)


def write_results_table(
    rows: list[dict[str, Any]], columns: list[str], out_dir: Path, notes: Sequence[str] = ()
) -> tuple[Path, Path, str]:
    """Results as CSV and Markdown (atomic writes). Returns (csv, md, markdown text)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for row in rows:
        md += "| " + " | ".join(str(row.get(c, "")) for c in columns) + " |\n"
    md += "".join(f"\n{note}\n" for note in notes)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    for path, text in ((csv_path, buf.getvalue()), (md_path, md)):
        with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        Path(fh.name).replace(path)
    return csv_path, md_path, md


def fmt_ci(accs: np.ndarray) -> str:
    mean, ci = accuracy_ci95(accs)
    return f"{mean:.2f} ± {ci:.2f}"


def fewshot_rows(
    per_shot: Mapping[int, Mapping[str, np.ndarray]],
    krecip_label: str,
    best_steps: int,
    methods: Sequence[str] = ("baseline", "k-reciprocal", "ssr"),
    costs: Mapping[int, Mapping[str, tuple[float, float]]] | None = None,
    queries: str | None = None,
    cost_episodes: int | None = None,
    ssr_rows: Sequence[tuple[str, str, str]] | None = None,
) -> list[dict]:
    """Rows Baseline / k-reciprocal / SSR and the peers of ``methods`` (in that order), one
    accuracy column per shot count.

    methods: "baseline", "k-reciprocal", "ssr" and ``ssr_model.baselines.PEER_METHODS`` names;
    costs: shot -> key (as in ``per_shot``, "ssr" for SSR) -> (ms per episode, peak MiB of one
    call on ``cost_episodes`` episodes), adding the columns "<shot>-shot ms/episode" and
    ``peak_column(shot, cost_episodes)``; queries: the query balance ("balanced",
    "dirichlet:ALPHA"), adding the column "queries"; ssr_rows: (label, accuracy key, cost key)
    of each SSR model, in place of the one "ssr" row (SSR trained on balanced and on Dirichlet
    query sets).
    """
    specs = []
    for name in methods:
        if name == "ssr" and ssr_rows is not None:
            specs += list(ssr_rows)
        else:
            specs.append(fewshot_method_row(name, krecip_label, best_steps))
    rows = []
    for label, key, cost_key in specs:
        row = {"method": label}
        if queries is not None:
            row["queries"] = queries_label(queries)
        for shot, res in per_shot.items():
            row[f"{shot}-shot acc (%)"] = fmt_ci(res[key])
            if costs is not None and cost_key in costs.get(shot, {}):
                ms, mib = costs[shot][cost_key]
                row[f"{shot}-shot ms/episode"] = f"{ms:.3g}"
                row[peak_column(shot, cost_episodes)] = fmt_peak_mib(mib)
        rows.append(row)
    return rows


def peak_column(shot: int, cost_episodes: int | None) -> str:
    """The header of a peak-memory column: "<shot>-shot peak MiB (E=<episodes of one call>)"."""
    return f"{shot}-shot peak MiB (E={cost_episodes})" if cost_episodes else f"{shot}-shot peak MiB per call"


def fmt_peak_mib(mib: float) -> str:
    """A peak in MiB: "< 1 MiB" below 1 MiB (nothing measurable is not 0), "n/a" when not measured."""
    if math.isnan(mib):
        return "n/a"
    return "< 1 MiB" if mib < 1 else f"{mib:,.0f}" if mib >= 1000 else f"{mib:.3g}"


def fewshot_method_row(name: str, krecip_label: str, best_steps: int) -> tuple[str, str, str]:
    """(table label, accuracy key, cost key) of a ``methods`` name."""
    if name == "baseline":
        return "Baseline (cosine to prototypes)", "baseline", "baseline"
    if name == "k-reciprocal":
        return f"k-reciprocal ({krecip_label})", "krecip", "krecip"
    if name == "ssr":
        return f"SSR (steps={best_steps})", f"ssr_step{best_steps}", "ssr"
    key = name.replace("-", "_").replace("+", "_")
    if name in COMPOSED_METHODS:
        return COMPOSED_METHODS[name].label, key, key
    return peer_method(name).label, key, key


def queries_label(query_balance: str) -> str:
    """ "balanced" or "Dirichlet α=ALPHA"."""
    return "balanced" if query_balance == "balanced" else f"Dirichlet α={query_balance.partition(':')[2]}"


def plot_accuracy_vs_cost(points: Sequence[tuple[str, int, np.ndarray, float]], title: str, ax=None):
    """Accuracy (mean with 95% CI bars) against ms per episode on a log axis.

    points: (method label, shot, per-episode accuracies (fractions), ms per episode); one
    colour per method, one marker per shot count. ax: draw into these axes (a panel of a
    larger figure) instead of a new figure. Returns the figure.
    """
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    fig = ax.figure
    labels = list(dict.fromkeys(p[0] for p in points))
    shots = sorted({p[1] for p in points})
    colours = plt.get_cmap("tab10")
    markers = "os^Dv"
    for label, shot, accs, ms in points:
        mean, ci = accuracy_ci95(accs)
        ax.errorbar(
            [ms],
            [mean],
            yerr=[ci],
            fmt=markers[shots.index(shot) % len(markers)],
            capsize=3,
            color=colours(labels.index(label) % 10),
        )
    for i, label in enumerate(labels):
        ax.plot([], [], "o", color=colours(i % 10), label=label)
    for j, shot in enumerate(shots):
        ax.plot([], [], markers[j % len(markers)], color="grey", label=f"{shot}-shot")
    ax.set_xscale("log")
    ax.set_xlabel("ms per episode (evaluation actor, log scale)")
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _plt():
    import matplotlib  # lazy: plotting only: matplotlib is slow to import and not needed by the rest

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see matplotlib above

    return plt


def plot_accuracy_by_step(per_shot: Mapping[int, Mapping[str, np.ndarray]], max_step: int):
    """Accuracy (mean with 95% CI bars) after each refinement step, per shot count."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for shot, res in per_shot.items():
        steps = [s for s in range(max_step + 1) if f"ssr_step{s}" in res]
        stats = [accuracy_ci95(res[f"ssr_step{s}"]) for s in steps]
        ax.errorbar(
            steps, [m for m, _ in stats], yerr=[c for _, c in stats], marker="o", capsize=3, label=f"{shot}-shot"
        )
    ax.set_xticks(range(max_step + 1))
    ax.set_xlabel("refinement step (0 = no SSR)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("SSR accuracy by refinement step")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_training_curves(trials) -> Any:
    """Validation accuracy against iteration, one line per trial across the curriculum stages.

    trials: few-shot trials (``ssr_tasks.fewshot.handoffs.FewShotTrial``).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    boundaries: set[int] = set()
    for trial in trials:
        offset, xs, ys = 0, [], []
        for stage in trial.stages:
            for h in stage.history:
                xs.append(offset + h.iteration)
                ys.append(100 * h.val_acc)
            offset = xs[-1] if xs else offset
            boundaries.add(offset)
        ax.plot(xs, ys, marker="o", label=trial.label)
    for b in sorted(boundaries)[:-1]:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("iteration (curriculum stages steps=1, 2, ... separated by dotted lines)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_map_by_method(rows: list[dict]):
    """Grouped bars of revisited mAP (Easy / Medium / Hard) per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.8))
    x = np.arange(len(rows))
    for i, proto in enumerate(("easy", "medium", "hard")):
        ax.bar(x + (i - 1) * 0.27, [r[f"mAP {proto}"] for r in rows], width=0.27, label=proto.capitalize())
    ax.set_xticks(x)
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mAP (%)")
    ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    _plt().close(fig)
    return path


GT_COLOURS = {"easy": "#2ca02c", "hard": "#1f77b4", "junk": "#7f7f7f", "negative": "#d62728"}


def gt_label(gnd_q: dict, idx: int) -> str:
    for key in ("easy", "hard", "junk"):
        if idx in set(int(i) for i in gnd_q[key]):
            return key
    return "negative"


def plot_reranked_example(query_img: np.ndarray, rows: Mapping[str, list[tuple[np.ndarray, str]]], title: str):
    """Query image and, per row (e.g. "features" / "features + SSR"), the top results framed by ground truth.

    query_img: (H, W) grey or (H, W, 3); rows: name -> list of (image, label in GT_COLOURS).
    """
    plt = _plt()
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(1.2 * (n + 1), 1.45 * len(rows)), squeeze=False)
    for r, (name, items) in enumerate(rows.items()):
        ax = axes[r, 0]
        ax.imshow(query_img, cmap="gray")
        ax.set_title("query" if r == 0 else "", fontsize=7)
        ax.set_ylabel(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        for c in range(n):
            ax = axes[r, c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            img, label = items[c]
            ax.imshow(img, cmap="gray")
            for spine in ax.spines.values():
                spine.set_edgecolor(GT_COLOURS[label])
                spine.set_linewidth(3)
            ax.set_title(f"{c + 1}: {label}", fontsize=6, color=GT_COLOURS[label])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
