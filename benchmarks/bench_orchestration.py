"""Share of wall time taken by orchestration (Prefect + Ray + MLflow) in a few-shot run.

Runs the same few-shot job twice from the same prepared data (rendered once beforehand,
not timed):
  A. the `ssr` flow: Prefect (temporary local API), Ray Tune trials and evaluation actors,
     MLflow tracking + registration;
  B. the same plain functions called directly in one process: pretraining, feature
     extraction, the curriculum for each lr_dni in turn, the k-reciprocal grid, evaluation.
Overhead share = (A - B) / A. Prints a Markdown table.

    python benchmarks/bench_orchestration.py --preset reproduce-fewshot-tiny
    python benchmarks/bench_orchestration.py --preset reproduce-fewshot   # the demo's sizes
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_run(params, home: Path) -> float:

    from ssr_tasks.backbone import extract_features, pretrain_backbone
    from ssr_tasks.config import apply_point, sweep_points
    from ssr_tasks.fewshot.episodes import load_split, sample_episodes
    from ssr_tasks.fewshot.evaluate import FewShotEvaluator
    from ssr_tasks.fewshot.handoffs import FewShotModel, KReciprocal
    from ssr_tasks.fewshot.train import train_curriculum

    t0 = time.perf_counter()
    root = home / "data" / "glyphs"
    bb, t, ev_params, bl = params.backbone, params.train, params.evaluation, params.baselines
    ckpt = pretrain_backbone(
        root,
        "glyphs",
        bb.name,
        home / "plain" / "bb.pt",
        epochs=bb.pretrain_epochs,
        batch_size=bb.pretrain_batch_size,
        lr=bb.pretrain_lr,
        seed=t.seed,
    )
    feats = extract_features(root, "glyphs", bb.name, ckpt, home / "plain" / "features.parquet")
    train, val = load_split(feats, "train"), load_split(feats, "val")
    val_eps = sample_episodes(val, ev_params.n_val_episodes, t.n_way, t.n_shot, t.n_query, seed=1)
    configs = [apply_point(t, point) for point in sweep_points(params.sweep)]  # one trial per point of the sweep
    trials = [
        (cfg, train_curriculum(cfg, train, val, val_eps, home / "plain" / f"trial{i}")) for i, cfg in enumerate(configs)
    ]
    cfg, best = max(trials, key=lambda trial: trial[1]["best_val"])
    ev = FewShotEvaluator(str(feats), "val", None)
    grid = [KReciprocal(a, b, c) for a in bl.krecip_k1 for b in bl.krecip_k2 for c in bl.krecip_lambda]
    ev.evaluate(val_eps, krecip=grid, with_ssr=False)
    test_ev = FewShotEvaluator(str(feats), "test", FewShotModel(best["best_path"], cfg, train.dim, best["best_steps"]))
    for shot in ev_params.eval_shots:
        eps = sample_episodes(load_split(feats, "test"), ev_params.n_test_episodes, t.n_way, shot, t.n_query, seed=shot)
        test_ev.evaluate(eps, krecip=[grid[0]])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="reproduce-fewshot-tiny")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ["SSR_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.cli import presets
    from ssr_tasks.config import FewShotParams
    from storage.glyphs import prepare_glyphs

    params = FewShotParams(**presets()[args.preset]["fewshot"])
    prepare_glyphs(home / "data", seed=params.data.data_seed, size=params.data.glyphs_size)

    from flows.ssr_flow import ssr

    t0 = time.perf_counter()
    ssr(pipeline="fewshot", fewshot=params)
    flow_s = time.perf_counter() - t0
    plain_s = plain_run(params, home)
    print(f"\npreset {args.preset}, {os.cpu_count()} CPUs\n")
    print("| run | wall (s) |")
    print("|---|---|")
    print(f"| A. `ssr` flow (Prefect + Ray + MLflow) | {flow_s:.1f} |")
    print(f"| B. same steps as plain calls | {plain_s:.1f} |")
    print(f"| orchestration share (A - B) / A | {100 * (flow_s - plain_s) / flow_s:.1f}% |")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
