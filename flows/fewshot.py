"""The few-shot subflow: data -> backbone -> features -> SSR on Ray -> evaluation -> MLflow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import pipeline_run, prefect_tags
from ssr_tasks import reporting, steps
from ssr_tasks.config import FewShotParams
from ssr_tasks.services import init_ray
from ssr_tasks.tracking import Tracker, write_results_table


@flow(name="ssr-fewshot", log_prints=True)
def fewshot_pipeline(params: FewShotParams = FewShotParams()) -> dict:
    """Reproduce the transductive few-shot table (Baseline / k-reciprocal / SSR)."""
    with pipeline_run("fewshot", params) as (tracker, run_id, run_dir, work):
        return _fewshot(params, tracker, run_id, run_dir, work)


def _fewshot(params: FewShotParams, tracker: Tracker, run_id: str, run_dir: Path, work: Path) -> dict:
    logger = get_run_logger()
    init_ray()
    data = steps.prepare_fewshot_data(params, str(run_dir))
    ckpt = steps.get_backbone(params, data["root"], str(run_dir / "backbones"))
    features = steps.extract(params, data["root"], ckpt, str(work))
    from storage.features import read_features

    feat_dim = int(read_features(Path(features), split="val").embeddings.shape[1])
    val_npz = steps.validation_episodes(params, features, data["val_json"], str(work))
    trials = steps.train_ssr(params, features, val_npz, str(work), feat_dim)
    best = max(trials, key=lambda t: t["best_val"])
    logger.info("SSR: best trial lr_dni=%g steps=%d val acc %.2f%%", best["lr_dni"], best["best_steps"], 100 * best["best_val"])
    krecip = steps.choose_krecip(params, features, val_npz)
    model_kwargs = {"feat_dim": feat_dim, "n_way": params.n_way, "n_query": params.n_way * params.n_query,
                    "steps": best["best_steps"], "lr_dni": best["lr_dni"], "hidden": params.hidden}
    per_shot = {}
    for shot in params.eval_shots:
        res = steps.evaluate_fewshot(params, features, best["best_path"], model_kwargs, krecip, shot)
        per_shot[shot] = {k: np.asarray(v) for k, v in res.items()}

    krecip_label = f"k1={krecip[0]}, k2={krecip[1]}, λ={krecip[2]}"
    rows = reporting.fewshot_rows(per_shot, krecip_label, best["best_steps"])
    columns = ["method"] + [f"{s}-shot acc (%)" for s in params.eval_shots]
    out_dir = work / "results" / (runtime.flow_run.id or "local")
    csv_path, md_path, md = write_results_table(rows, columns, out_dir)
    figs = {
        "accuracy_by_step.png": reporting.plot_accuracy_by_step(per_shot, best["best_steps"]),
        "training_curves.png": reporting.plot_training_curves(trials),
    }
    fig_paths = {name: reporting.save_figure(fig, out_dir / name) for name, fig in figs.items()}

    registered = _track(tracker, run_id, params, trials, best, per_shot, krecip, csv_path, md_path, fig_paths, model_kwargs, ckpt)
    mlflow_ui = f"runs/{registered['run_id']}"
    create_table_artifact(key="fewshot-results", table=rows, description=f"Few-shot results ({params.dataset}, {params.backbone})")
    create_markdown_artifact(
        key="fewshot-report",
        markdown=f"# SSR few-shot: {params.dataset}, {params.backbone}\n\n{md}\n"
        f"Model: `{registered['model_uri']}` (aliases moved: {registered['aliases'] or 'none'})\n\n"
        f"MLflow run `{registered['run_id']}` in experiment `ssr-fewshot` ({mlflow_ui}); plots: "
        + ", ".join(f"`{n}`" for n in fig_paths) + "\n",
        description="Results table, model and plots",
    )
    print(md)
    return {"results": rows, "markdown": md, **registered}


def _track(tracker: Tracker, run_id: str, params, trials, best, per_shot, krecip, csv_path, md_path, fig_paths, model_kwargs, backbone_ckpt) -> dict:
    """Into the open parent run: nested runs per Ray trial, tables, plots and the registered model."""
    import torch

    from ssr_model.metrics import accuracy_ci95
    from ssr_model.packaged import FewShotClassifier
    from ssr_tasks.backbone_step import load_backbone

    for trial in trials:
        with tracker.run(f"trial lr_dni={trial['lr_dni']:g}", nested=True, tags=prefect_tags()):
            tracker.log_params({"lr_dni": trial["lr_dni"], "max_steps": params.max_steps})
            offset = 0
            for stage in trial["stages"]:
                for h in stage["history"]:
                    tracker.log_metrics({"val_acc": 100 * h["val_acc"], "loss": h["loss"], "steps": stage["steps"]},
                                        step=offset + h["iteration"])
                offset += stage["history"][-1]["iteration"] if stage["history"] else 0
            tracker.log_metrics({"best_val_acc": 100 * trial["best_val"], "best_steps": trial["best_steps"]})
    metrics = {"best_val_acc": 100 * best["best_val"], "best_steps": best["best_steps"],
               "krecip_k1": krecip[0], "krecip_k2": krecip[1], "krecip_lambda": krecip[2]}
    for shot, res in per_shot.items():
        for key, accs in res.items():
            mean, ci = accuracy_ci95(accs)
            metrics[f"test_{shot}shot_{key}"] = mean
            metrics[f"test_{shot}shot_{key}_ci95"] = ci
    tracker.log_metrics(metrics)
    tracker.log_file(csv_path, "results")
    tracker.log_file(md_path, "results")
    for path in fig_paths.values():
        tracker.log_file(path, "plots")
    from ssr_model import FewShotSSR

    ssr = FewShotSSR(**model_kwargs)
    ssr.load_state_dict(torch.load(best["best_path"], map_location="cpu", weights_only=True))
    backbone = load_backbone(params.backbone, "glyphs" if params.dataset == "glyphs" else params.dataset, Path(backbone_ckpt))
    model = FewShotClassifier(ssr.eval(), backbone.cpu().eval())
    reg = tracker.log_and_register(
        model, params.model_name,
        tags={"dataset": params.dataset, "backbone": params.backbone, "steps": str(best["best_steps"]),
              "val_metric_name": "val_acc_1shot"},
        val_metric=100 * best["best_val"],
    )
    tracker.log_metrics({"registered_version": reg["version"]})
    return {**reg, "run_id": run_id, "tracking_uri": tracker.safe_uri}
