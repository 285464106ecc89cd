"""Cost of Tune checkpoints in SSR training: a report with the trial's workspace as a
checkpoint against a report of metrics only, at the paper's few-shot model size.

A real Ray Tune trial builds the training state the few-shot curriculum keeps during its
last stage in a ``TrialWorkspace``: ``best.pt`` of each finished stage, and ``last.pt``
(the model and SGD momentum) plus ``best.pt`` of the running one and reports ``--reports`` times each way, alternating; Tune copies the
folder to its storage (a local folder here, ``--storage`` for another path or URI) on
every checkpointed report. Prints a Markdown table: workspace size, ms per report, and the
share of one validation period of training that a checkpoint adds (the period's time is
``--period-s``; measure it with ``bench_ssr_model.py``'s training step x ``val_every``).

    python benchmarks/bench_tune_checkpoints.py
    python benchmarks/bench_tune_checkpoints.py --feat-dim 640 --hidden 4096 --steps 3 --reports 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def trainable(config: dict) -> None:
    import torch
    from ray import tune

    from ssr_model import FewShotSSR
    from ssr_tasks.ray_grid import TrialWorkspace
    from storage.checkpoints import save_checkpoint

    with TrialWorkspace() as ws:
        for steps in range(1, config["steps"] + 1):
            model = FewShotSSR(config["feat_dim"], 5, 75, steps, hidden=config["hidden"])
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()  # momentum buffers exist, as after training
            stage = ws.path / f"steps{steps}"
            stage.mkdir()
            if steps == config["steps"]:  # finished stages drop their last.pt
                save_checkpoint(
                    stage / "last.pt",
                    {
                        "states": {"model": model.state_dict(), "optim": opt.state_dict()},
                        "done": 0,
                        "best": 0.0,
                        "history": "[]",
                    },
                )
            save_checkpoint(stage / "best.pt", model.state_dict())
        size = sum(f.stat().st_size for f in ws.path.rglob("*") if f.is_file())
        for i in range(config["reports"]):
            for with_ckpt in (i % 2 == 0, i % 2 == 1):  # alternate which goes first
                t0 = time.perf_counter()
                if with_ckpt:
                    ws.report({"iteration": i, "kind": 1})
                else:
                    tune.report({"iteration": i, "kind": 0})
                tune.report(
                    {"timing": 1, "with_ckpt": int(with_ckpt), "ms": 1000 * (time.perf_counter() - t0), "size": size}
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feat-dim", type=int, default=640)
    ap.add_argument("--hidden", type=int, default=4096, help="paper few-shot: 4096")
    ap.add_argument("--steps", type=int, default=3, help="the running stage S (steps 1..S-1 finished)")
    ap.add_argument("--reports", type=int, default=10, help="reports of each kind")
    ap.add_argument("--storage", default=None, help="Tune storage path or URI (default: a temp folder)")
    ap.add_argument(
        "--period-s",
        type=float,
        default=None,
        help="seconds of training between two validations, to express the checkpoint's share",
    )
    args = ap.parse_args()

    import ray
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or tmp
        tuner = tune.Tuner(
            trainable,
            param_space={
                "feat_dim": args.feat_dim,
                "hidden": args.hidden,
                "steps": args.steps,
                "reports": args.reports,
            },
            run_config=tune.RunConfig(
                name="bench-ckpt",
                storage_path=storage,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
        [result] = list(tuner.fit())
        if result.error:
            raise result.error
        rows = result.metrics_dataframe
    rows = rows[rows["timing"] == 1]
    ckpt = rows[rows["with_ckpt"] == 1]["ms"].tolist()
    plain = rows[rows["with_ckpt"] == 0]["ms"].tolist()
    size_mib = float(rows["size"].iloc[0]) / 2**20
    med_c, med_p = statistics.median(ckpt), statistics.median(plain)
    print(
        f"few-shot SSR d={args.feat_dim} hidden={args.hidden}, workspace of steps 1..{args.steps}: "
        f"{size_mib:.0f} MiB; median of {args.reports} reports each, alternating\n"
    )
    print(
        "| report | ms per report | added by the checkpoint (ms) | MB/s copied |"
        + (" share of a validation period |" if args.period_s else "")
    )
    print("|---|---|---|---|" + ("---|" if args.period_s else ""))
    print(f"| metrics only | {med_p:.1f} | | |" + (" |" if args.period_s else ""))
    added = med_c - med_p
    share = f" {100 * added / 1000 / args.period_s:.2f}% |" if args.period_s else ""
    print(
        f"| metrics + workspace checkpoint | {med_c:.1f} | {added:.1f} | {size_mib * 1.048576 / (med_c / 1000):.0f} |{share}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
