"""SSR trained at each shot count, tested at each shot count, against the baseline (issue 21, item 3).

    ssr run fewshot --preset reproduce-fewshot --set 'sweep={"lr_dni": [0.01, 0.1], "n_shot": [1, 5]}'
    python benchmarks/bench_fewshot_shots.py --run runs/fewshot/glyphs-conv4-64-seed0

``--run`` is a finished few-shot run folder whose SSR grid swept ``n_shot``: its features
table (``features-*.parquet``) and trials (``ssr-*/trials/*/summary.json``). For every shot
count SSR was trained at, the best trial by its own validation (each n_shot validates on its
own shot's episodes, so only those compare, as ``trained_for`` picks) is tested at every
shot of ``--shots``, on the test episodes the ``evaluate-fewshot`` task draws (seed
20,000 + seed + shot; balanced, or ``--balance dirichlet:ALPHA``). The pipeline's own table
has one SSR per column (the model trained at that shot); this one fills the whole grid.
Prints a Markdown table, mean ± 95% interval over episodes. Not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssr_model.metrics import accuracy_ci95
from ssr_tasks.config import FewShotTrainParams, query_balance_alpha
from ssr_tasks.fewshot.episodes import EpisodeIndices, sample_dirichlet_episodes, sample_episodes
from ssr_tasks.fewshot.evaluate import EpisodeScores, FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotTrial
from ssr_tasks.ray_grid import SUMMARY, read_summary
from storage.features import read_metadata


def best_per_shot(run: Path, feat_dim: int, train_balance: str = "balanced") -> dict[int, FewShotTrial]:
    """The finished trial with the best validation accuracy at each training shot count, among
    those trained with ``train_balance`` query sets (``train.query_balance``; only their
    validation scores compare)."""
    best: dict[int, FewShotTrial] = {}
    for summary in sorted(run.glob(f"ssr-*/trials/*/{SUMMARY}")):
        config = FewShotTrainParams(**json.loads((summary.parent / "config.json").read_text()))
        label = summary.parent.name.rsplit("-", 1)[0]
        if config.trained_balance != train_balance:
            continue
        trial = FewShotTrial.from_summary(config, label, feat_dim, read_summary(summary.parent))
        if config.n_shot not in best or trial.best_val > best[config.n_shot].best_val:
            best[config.n_shot] = trial
    if not best:
        raise SystemExit(f"{run}: no finished SSR trial trained {train_balance} (ssr-*/trials/*/{SUMMARY})")
    return best


def score(ev: FewShotEvaluator, eps: EpisodeIndices, with_ssr: bool, chunk: int = 50) -> EpisodeScores:
    return EpisodeScores.merge([ev.evaluate(eps.chunk(s, s + chunk), (), with_ssr) for s in range(0, len(eps), chunk)])


def cell(accs) -> str:
    mean, ci = accuracy_ci95(accs)
    return f"{mean:.2f} ± {ci:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--balance", default="balanced", help="balanced or dirichlet:ALPHA (test queries)")
    ap.add_argument("--train-balance", default="balanced", help="SSR trained on these query sets (train.query_balance)")
    ap.add_argument("--seed", type=int, default=0, help="the run's train.seed (test episodes: 20,000 + seed + shot)")
    args = ap.parse_args()
    alpha = query_balance_alpha(args.balance)

    features = next(iter(sorted(args.run.glob("features-*.parquet"))))
    trials = best_per_shot(args.run, int(read_metadata(features)["dim"]), args.train_balance)
    for shot, t in sorted(trials.items()):
        where = Path(t.best_path).resolve().relative_to(args.run.resolve())
        print(f"trained at {shot} shots: {t.label}, steps={t.best_steps}, validation {100 * t.best_val:.2f}% ({where})")
    evaluators = {shot: FewShotEvaluator(str(features), "test", t.model, threads=1) for shot, t in trials.items()}
    test = next(iter(evaluators.values())).split

    rows: dict[str, list[str]] = {"Baseline (cosine to prototypes)": []}
    for shot, t in sorted(trials.items()):
        rows[f"SSR trained {shot}-shot ({t.label}, steps={t.best_steps})"] = []
    for shot in args.shots:
        seed = 20_000 + args.seed + shot
        n_way, n_query = 5, 15
        if alpha is None:
            eps = sample_episodes(test, args.episodes, n_way, shot, n_query, seed=seed)
        else:
            eps = sample_dirichlet_episodes(test, args.episodes, n_way, shot, n_way * n_query, alpha, seed=seed)
        baseline = None
        for trained, t in sorted(trials.items()):
            res = score(evaluators[trained], eps, True)
            baseline = res.baseline if baseline is None else baseline
            rows[f"SSR trained {trained}-shot ({t.label}, steps={t.best_steps})"].append(
                cell(res.ssr_by_step[t.best_steps])
            )
        rows["Baseline (cosine to prototypes)"].append(cell(baseline))
        print(f"{shot}-shot: {len(eps)} episodes ({args.balance})", flush=True)

    print(f"\nfeatures {features}; test queries {args.balance}\n")
    print("| method | " + " | ".join(f"{s}-shot acc (%)" for s in args.shots) + " |")
    print("|---|" + "---|" * len(args.shots))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
