"""The retrieval subflow: data -> backbone (glyphs) -> features -> SSR on Ray -> stores -> actor re-ranking -> mAP."""

from __future__ import annotations

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.common import prefect_tags
from ssr_tasks.backbone import get_backbone
from ssr_tasks.config import RetrievalParams
from ssr_tasks.handoffs import required
from ssr_tasks.pipeline import pipeline_run
from ssr_tasks.retrieval import report, tasks
from ssr_tasks.services import init_ray


@flow(name="ssr-retrieval", log_prints=True)
def retrieval_pipeline(params: RetrievalParams = RetrievalParams()) -> dict:
    """Reproduce the retrieval table: features only, QE variants, k-reciprocal, each + SSR."""
    with pipeline_run("retrieval", params, prefect_tags(), runtime.flow_run.id) as run:
        init_ray()
        device = params.device
        data_params = tasks.data_for_run(params)  # from_data: the held-out fraction sized for k
        data = tasks.prepare_data(data_params, str(run.run_dir))
        backbone = (
            get_backbone(
                params.backbone,
                required(params.data.entry.spec, "the image spec of the data set"),
                params.train.seed,
                required(data.fewshot_root, "the glyphs' few-shot root"),
                str(run.backbones),
                device,
            )
            if data.needs_backbone
            else None
        )
        features = tasks.extract_features(data_params, params.k_max, data, backbone, str(run.work), device)
        train, sweep = (
            tasks.settings_from_data(params.train, params.sweep, features)
            if params.from_data
            else (params.train, params.sweep)
        )
        trials = tasks.train_ssr(train, sweep, features, str(run.work), run.trial_tracking(prefect_tags()), device)
        rankings = tasks.rank_methods(
            params.baselines,
            train,
            params.k_max,
            params.evaluation.shard_size,
            features,
            str(run.work),
            params.evaluation.n_search_actors,
        )
        reranked = [
            tasks.rerank(params.evaluation, rankings, method, trials.best.model, device) for method in rankings.methods
        ]
        results = report.write_report(params, data, rankings, reranked, str(run.results), report.ssr_improved(trials))
        registered = report.log_and_register(run.tracker, params, trials, rankings.choice, results, prefect_tags())
        chosen = report.describe_choice(trials, rankings.choice)

        create_link_artifact(
            key="retrieval-mlflow-run",
            link=run.tracker.run_url(registered.run_id),
            link_text=f"MLflow run {registered.run_id} ({registered.model_uri})",
            description="The MLflow run of this flow run: metrics, plots, tables and the logged model",
        )
        create_table_artifact(key="retrieval-results", table=list(results.rows), description="Revisited mAP per method")
        create_markdown_artifact(
            key="retrieval-report",
            markdown=f"# SSR retrieval: {params.data.dataset}\n\n{results.markdown}\n"
            f"Chosen on validation (held-out training clusters): {chosen}\n\n"
            f"Model: `{registered.model_uri}` (aliases moved: {list(registered.aliases) or 'none'}); "
            f"MLflow run `{registered.run_id}`.\n",
        )
        print(results.markdown)
        return {"results": list(results.rows), "markdown": results.markdown, "chosen": chosen, **registered.as_dict()}
