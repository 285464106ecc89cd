"""SSR against the transductive peers on one features table: accuracy and cost, balanced and
Dirichlet queries, 1-shot and 5-shot. Prints a Markdown table and writes one plot. Not a test.

    python benchmarks/bench_fewshot_peers.py --run runs/fewshot/glyphs-conv4-64-seed0 --out docs/img

``--run`` is a finished few-shot run folder of the pipeline: its features table
(``features-*.parquet``), fixed validation episodes (``val-episodes-*.npz``) and trained SSR
trials (``ssr-*/trials/lr_dni=*/summary.json``; the best by validation accuracy is used, as
the pipeline does). The k-reciprocal setting is chosen on the validation episodes over the
pipeline's default grid. Test episodes are drawn exactly as the ``evaluate-fewshot`` task
draws them (same seeds: 20,000 + seed + shot), balanced and ``dirichlet:ALPHA``.

Every method runs through ``FewShotEvaluator.evaluate`` (the class the Ray actors wrap) in
this one process, one thread, in chunks of 50 episodes, so ms and peak memory per episode
are measured exactly as in the actors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ssr_model.baselines import PEER_METHODS
from ssr_model.metrics import accuracy_ci95
from ssr_tasks import reporting
from ssr_tasks.config import FewShotParams, FewShotTrainParams
from ssr_tasks.fewshot.episodes import (
    EpisodeIndices,
    repeated_query_fraction,
    sample_dirichlet_episodes,
    sample_episodes,
)
from ssr_tasks.fewshot.evaluate import EpisodeScores, FewShotEvaluator, krecip_key
from ssr_tasks.fewshot.handoffs import FewShotTrial, KReciprocal
from ssr_tasks.ray_grid import SUMMARY, read_summary
from storage.features import read_metadata


def best_trial(run: Path, feat_dim: int) -> FewShotTrial:
    """The finished trial (``ssr-*/trials/<label>-<hash>``) with the best validation accuracy."""
    trials = []
    for summary in sorted(run.glob(f"ssr-*/trials/*/{SUMMARY}")):
        config = FewShotTrainParams(**json.loads((summary.parent / "config.json").read_text()))
        label = summary.parent.name.rsplit("-", 1)[0]  # trial_dir: the point's label, then a hash of the point
        # read_summary makes the summary's best_path absolute (it is stored relative to the trial folder)
        trials.append(FewShotTrial.from_summary(config, label, feat_dim, read_summary(summary.parent)))
    if not trials:
        raise SystemExit(f"{run}: no finished SSR trial (ssr-*/trials/*/{SUMMARY})")
    return max(trials, key=lambda t: t.best_val)


def score(
    ev: FewShotEvaluator,
    eps: EpisodeIndices,
    krecip: list[KReciprocal],
    with_ssr: bool,
    peers: list[str],
    chunk: int = 50,
) -> EpisodeScores:
    return EpisodeScores.merge(
        [ev.evaluate(eps.chunk(s, s + chunk), krecip, with_ssr, peers) for s in range(0, len(eps), chunk)]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    features = next(iter(sorted(args.run.glob("features-*.parquet"))))
    trial = best_trial(args.run, int(read_metadata(features)["dim"]))
    params = FewShotParams(evaluation={"n_test_episodes": args.episodes}, train={"seed": args.seed})
    bl, n_way, n_query = params.baselines, trial.config.n_way, trial.config.n_query
    val_eps = EpisodeIndices.load(next(iter(sorted(args.run.glob("val-episodes-*.npz")))))
    grid = [KReciprocal(k1, k2, lam) for k1 in bl.krecip_k1 for k2 in bl.krecip_k2 for lam in bl.krecip_lambda]
    val = score(FewShotEvaluator(str(features), "val", None, threads=1), val_eps, grid, False, [])
    krecip = max(grid, key=lambda g: float(val.krecip[g].mean()))
    print(
        f"features {features}; SSR {trial.label} steps={trial.best_steps} (val {100 * trial.best_val:.2f}%); "
        f"k-reciprocal {krecip.label} chosen on {len(val_eps)} validation episodes"
    )

    ev = FewShotEvaluator(str(features), "test", trial.model, threads=1)
    test = ev.split
    peers = list(PEER_METHODS)
    methods = list(params.evaluation.methods)
    balances = ["balanced", f"dirichlet:{args.alpha:g}"]
    results: dict[tuple[str, int], EpisodeScores] = {}
    for balance in balances:
        for shot in args.shots:
            seed = 20_000 + params.train.seed + shot
            if balance == "balanced":
                eps = sample_episodes(test, args.episodes, n_way, shot, n_query, seed=seed)
            else:
                eps = sample_dirichlet_episodes(
                    test, args.episodes, n_way, shot, n_way * n_query, args.alpha, seed=seed
                )
            results[balance, shot] = score(ev, eps, [krecip], True, peers)
            print(
                f"{balance} {shot}-shot: {len(eps)} episodes, repeated queries {100 * repeated_query_fraction(eps):.1f}%",
                flush=True,
            )

    def acc_and_cost(res: EpisodeScores, name: str) -> tuple[np.ndarray, float, float, float]:
        """Accuracies (E,), wall ms, peak MiB and CPU ms per episode of a ``methods`` name."""
        _, key, cost_key = reporting.fewshot_method_row(name, krecip.label, trial.best_steps)
        accs = {
            "baseline": res.baseline,
            "krecip": res.krecip[krecip],
            **{f"ssr_step{s}": a for s, a in enumerate(res.ssr_by_step)},
            **{p.replace("-", "_"): a for p, a in res.peers.items()},
        }
        costs = {
            "krecip": res.cost[krecip_key(krecip)],
            **res.cost,
            **{p.replace("-", "_"): c for p, c in res.cost.items()},
        }
        c = costs[cost_key]
        return accs[key], c.ms_per_episode, c.peak_mib_per_episode, c.cpu_ms_per_episode

    cols = [f"{'bal.' if b == 'balanced' else 'Dir.'} {s}-shot" for b in balances for s in args.shots]
    lines = [
        "| method | "
        + " | ".join(f"{c} acc (%)" for c in cols)
        + " | ms/episode, wall (1-shot / 5-shot) | ms/episode, CPU | peak MiB/episode |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    for name in methods:
        label = reporting.fewshot_method_row(name, krecip.label, trial.best_steps)[0]
        cells, ms, cpu, mib = [], [], [], []
        for b in balances:
            for s in args.shots:
                accs, t, m, c = acc_and_cost(results[b, s], name)
                mean, ci = accuracy_ci95(accs)
                cells.append(f"{mean:.2f} ± {ci:.2f}")
                if b == "balanced":
                    ms.append(f"{t:.3g}")
                    cpu.append(f"{c:.3g}")
                    mib.append(m)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {' / '.join(ms)} | {' / '.join(cpu)} | {max(mib):.2g} |"
        )
    print("\n".join(lines))

    plt = reporting._plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, b in zip(axes, balances):
        points = []
        for name in methods:
            label = reporting.fewshot_method_row(name, krecip.label, trial.best_steps)[0]
            for s in args.shots:
                accs, t, _, _ = acc_and_cost(results[b, s], name)
                points.append((label, s, accs, t))
        reporting.plot_accuracy_vs_cost(points, f"glyphs, conv4-64, 5-way, queries {reporting.queries_label(b)}", ax=ax)
    for ax in axes[:-1]:
        ax.get_legend().remove()
    fig.tight_layout()
    out = reporting.save_figure(fig, args.out / "fewshot_peers.png")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
