"""The retrieval subflow: data -> backbone -> features -> SSR on Ray -> stores -> actor re-ranking -> mAP."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import pipeline_run, prefect_tags
from ssr_tasks import reporting, steps
from ssr_tasks.config import RetrievalParams
from ssr_tasks.services import init_ray
from ssr_tasks.tracking import Tracker, write_results_table


@flow(name="ssr-retrieval", log_prints=True)
def retrieval_pipeline(params: RetrievalParams = RetrievalParams()) -> dict:
    """Reproduce the retrieval table: features only, QE variants, k-reciprocal, each + SSR."""
    with pipeline_run("retrieval", params) as (tracker, run_id, run_dir, work):
        return _retrieval(params, tracker, run_id, run_dir, work)


def _retrieval(params: RetrievalParams, tracker: Tracker, run_id: str, run_dir: Path, work: Path) -> dict:
    import torch

    from storage.features import read_features, write_features
    from storage.landmarks import read_revisited_gnd
    from ssr_model import RetrievalSSR
    from ssr_model.packaged import RetrievalReranker
    from ssr_tasks.retrieval_eval import map_row, method_rankings, ranks_after_rerank, write_ranking_store

    logger = get_run_logger()
    init_ray()
    data = steps.prepare_retrieval_data(params, str(run_dir))
    ckpt = steps.get_backbone(params, data["fewshot_root"], str(run_dir / "backbones"))
    features = steps.extract_retrieval(params, data, ckpt, str(work))
    db = read_features(Path(features), split="database")
    qt = read_features(Path(features), split="query")
    if params.k > len(db.ids):
        raise ValueError(f"k: {params.k} is larger than the database ({len(db.ids)} images)")
    feat_dim = int(db.embeddings.shape[1])
    trials = steps.train_retrieval_ssr(params, features, str(work), feat_dim)
    best = max(trials, key=lambda t: t["best_val"])
    logger.info("SSR: best trial lr_dni=%g, validation AP %.2f%%", best["lr_dni"], 100 * best["best_val"])
    model_kwargs = {"feat_dim": feat_dim, "k": params.k, "steps": params.steps, "lr_dni": best["lr_dni"], "hidden": params.hidden}

    gnd = read_revisited_gnd(Path(data["gnd"])).gnd
    methods = method_rankings(qt.embeddings, db.embeddings, params.qe_n)
    # Plain separate feature table for the database (row = id) used by the re-ranking actors.
    db_path = work / "database.parquet"
    if not db_path.exists():
        write_features(db_path, ids=np.arange(len(db.ids)), labels=["db"] * len(db.ids), splits=["database"] * len(db.ids),
                       embeddings=db.embeddings, metadata={**db.metadata})
    rows, tag = [], steps.short_hash([features, best["best_path"]])
    for m in methods:
        stores = work / "stores" / tag / m.name
        q_path = stores.parent / f"queries-{m.name}.parquet"
        stores.parent.mkdir(parents=True, exist_ok=True)
        if not q_path.exists():
            write_features(q_path, ids=np.arange(len(m.query)), labels=["query"] * len(m.query), splits=["query"] * len(m.query),
                           embeddings=m.query.astype(np.float32), metadata={**db.metadata, "method": m.name})
        store = write_ranking_store(stores / "topk", m, min(len(db.ids), max(params.k, 100)), params.shard_size, source=features)
        reranked = steps.rerank(str(store.path), str(q_path), str(db_path), str(stores / "reranked"), best["best_path"],
                                model_kwargs, params.n_rerank_actors)
        rows.append(map_row(m.name, m.ranks, gnd))
        rows.append(map_row(f"{m.name} + SSR", ranks_after_rerank(Path(reranked), m.ranks), gnd))
        logger.info("mAP %s: M %.2f H %.2f -> + SSR: M %.2f H %.2f", m.name, rows[-2]["mAP medium"], rows[-2]["mAP hard"],
                    rows[-1]["mAP medium"], rows[-1]["mAP hard"])

    example = _example_figure(data, methods[0], ranks_after_rerank(work / "stores" / tag / methods[0].name / "reranked", methods[0].ranks), gnd)

    columns = ["method", "mAP easy", "mAP medium", "mAP hard", "mP@10 medium", "mP@10 hard"]
    out_dir = work / "results" / str(runtime.flow_run.id or "local")
    csv_path, md_path, md = write_results_table(rows, columns, out_dir)
    fig_path = reporting.save_figure(reporting.plot_map_by_method(rows), out_dir / "map_by_method.png")
    example_path = reporting.save_figure(example, out_dir / "reranked_example.png")

    for trial in trials:
        with tracker.run(f"trial lr_dni={trial['lr_dni']:g}", nested=True, tags=prefect_tags()):
            tracker.log_params({"lr_dni": trial["lr_dni"]})
            for h in trial["history"]:
                tracker.log_metrics({"val_ap": 100 * h["val_ap"]}, step=int(h["iteration"]))
            tracker.log_metrics({"best_val_ap": 100 * trial["best_val"]})
    for r in rows:
        key = r["method"].replace(" + ", "_plus_").replace(" ", "_")
        tracker.log_metrics({f"{key}_map_{p}": r[f"mAP {p}"] for p in ("easy", "medium", "hard")})
    tracker.log_file(csv_path, "results")
    tracker.log_file(md_path, "results")
    tracker.log_file(fig_path, "plots")
    tracker.log_file(example_path, "plots")
    ssr = RetrievalSSR(**model_kwargs)
    ssr.load_state_dict(torch.load(best["best_path"], map_location="cpu", weights_only=True))
    reg = tracker.log_and_register(RetrievalReranker(ssr.eval()), params.model_name,
                                   tags={"dataset": params.dataset, "backbone": params.backbone, "steps": str(params.steps),
                                         "k": str(params.k), "val_metric_name": "val_ap"},
                                   val_metric=100 * best["best_val"])
    create_table_artifact(key="retrieval-results", table=rows, description="Revisited mAP per method")
    create_markdown_artifact(key="retrieval-report", markdown=f"# SSR retrieval: {params.dataset}\n\n{md}\n"
                             f"Model: `{reg['model_uri']}` (aliases moved: {reg['aliases'] or 'none'}); MLflow run `{run_id}`.\n")
    print(md)
    return {"results": rows, "markdown": md, **reg, "run_id": run_id, "tracking_uri": tracker.safe_uri}


def _example_figure(data: dict, method, reranked: np.ndarray, gnd: list[dict], top: int = 8):
    """Query whose medium AP SSR improved most: top results before and after, framed by ground truth."""
    from PIL import Image

    from storage.landmarks import read_revisited_gnd
    from ssr_model.metrics import revisited_map

    names = read_revisited_gnd(Path(data["gnd"]))
    jpg = Path(data["root"]) / "test" / "jpg"
    gains = []
    for q in range(len(gnd)):
        if len(gnd[q]["easy"]) + len(gnd[q]["hard"]) == 0:
            gains.append(-np.inf)
            continue
        before = revisited_map(method.ranks[q : q + 1], gnd[q : q + 1])["medium"]["map"]
        after = revisited_map(reranked[q : q + 1], gnd[q : q + 1])["medium"]["map"]
        gains.append(after - before)
    q = int(np.argmax(gains))
    load = lambda name: np.asarray(Image.open(jpg / f"{name}.png"))
    rows = {
        label: [(load(names.imlist[i]), reporting.gt_label(gnd[q], int(i))) for i in ranks[q, :top]]
        for label, ranks in (("features", method.ranks), ("features + SSR", reranked))
    }
    return reporting.plot_reranked_example(load(names.qimlist[q]), rows,
                                           f"query {names.qimlist[q]}: medium AP {gains[q]:+.1f} points with SSR")
