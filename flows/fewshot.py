"""The few-shot subflow: data -> backbone -> features -> SSR on Ray -> evaluation -> MLflow."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.common import prefect_tags
from ssr_tasks.backbone import get_backbone, spec_params
from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot import report, tasks
from ssr_tasks.fewshot.handoffs import trained_for
from ssr_tasks.pipeline import pipeline_run
from ssr_tasks.services import init_ray


@flow(name="ssr-fewshot", log_prints=True)
def fewshot_pipeline(params: FewShotParams = FewShotParams()) -> dict:
    """Reproduce the transductive few-shot table (Baseline / k-reciprocal / SSR)."""
    with pipeline_run("fewshot", params, prefect_tags(), runtime.flow_run.id) as run:
        init_ray()
        dataset, train, evaluation, device = params.data.dataset, params.train, params.evaluation, params.device
        data = tasks.prepare_data(params.data, train.episode, str(run.run_dir))
        released = (
            tasks.released_model(params.backbone, dataset, train.episode, str(run.work))
            if params.backbone.released_checkpoint
            else None
        )
        if params.data.entry.images:
            spec = tasks.image_spec(params.data, data, str(run.work))
            run.tracker.log_params(spec_params(spec))  # auto normalisation: the mean and std it computed
            backbone = (
                released.backbone
                if released
                else get_backbone(params.backbone, spec, train.seed, data.root, str(run.backbones), device)
            )
            features = tasks.extract_features(data, backbone, str(run.work), device)
        else:  # embeddings given: no backbone
            backbone, features = None, tasks.import_features(params.data, str(run.run_dir))
        left_out = tasks.check_classes(features, train.episode, evaluation.eval_shots)
        run.tracker.log_metrics({f"classes_left_out_{split}": n for split, n in left_out})
        val = tasks.validation_episodes(
            evaluation.n_val_episodes, train.episode, train.seed, features, data, str(run.work)
        )
        # one SSR model per query balance of the training episodes (train.query_balance); the first is the primary
        balances = ["balanced"] if released else params.training_balances
        if released:  # the authors' model: evaluated as it is, with the sweep's first point
            trials = tasks.released_trials(
                params.first_train, features, val, released, evaluation.n_eval_actors, device
            )
        else:
            training = (
                tasks.training_features(train.train_augment, train.seed, data, backbone, str(run.work), device)
                if backbone is not None
                else None
            )
            val_by_shot = tuple(  # each shot count and query balance validates on its own episodes
                (
                    shot,
                    balance,
                    val
                    if shot == train.n_shot and balance == "balanced"
                    else tasks.validation_episodes(
                        evaluation.n_val_episodes,
                        replace(train.episode, n_shot=shot),
                        train.seed,
                        features,
                        data
                        if shot == train.n_shot
                        else tasks.prepare_data(params.data, replace(train.episode, n_shot=shot), str(run.run_dir)),
                        str(run.work),
                        balance,
                    ),
                )
                for shot in tasks.training_shots(train, params.sweep)
                for balance in balances
            )
            sweep = tasks.scaled_sweep(params.sweep, features) if params.from_data else params.sweep
            trials = tasks.train_ssr(
                train,
                sweep,
                features,
                val,
                str(run.work),
                training,
                run.trial_tracking(prefect_tags()),
                device,
                val_by_shot,
                tuple(balances),
            )
        krecip = tasks.choose_krecip(params.baselines, features, val, evaluation.n_eval_actors, device)
        # each test column uses the model trained at its shot count when the sweep has one, per query balance
        shots = [
            tasks.evaluate(
                evaluation,
                train.episode,
                train.seed,
                features,
                trained_for(trials, shot, train.n_shot, balances[0]).model,
                krecip,
                shot,
                device,
                tuple((b, trained_for(trials, shot, train.n_shot, b).model) for b in balances[1:]),
            )
            for shot in evaluation.eval_shots
        ]
        results = report.write_report(params, trials, krecip, shots, str(run.results))
        registered, *others = report.log_and_register(
            run.tracker, params, trials, krecip, shots, results, backbone, prefect_tags()
        )

        create_link_artifact(
            key="fewshot-mlflow-run",
            link=run.tracker.run_url(registered.run_id),
            link_text=f"MLflow run {registered.run_id} ({registered.model_uri})",
            description="The MLflow run of this flow run: metrics, plots, tables and the logged model",
        )
        create_table_artifact(
            key="fewshot-results",
            table=list(results.rows),
            description=f"Few-shot results ({dataset}, {params.backbone.name})",
        )
        create_markdown_artifact(
            key="fewshot-report",
            markdown=f"# SSR few-shot: {dataset}, {params.backbone.name}\n\n{results.markdown}\n"
            + "".join(
                f"Model: `{r.model_uri}` (aliases moved: {list(r.aliases) or 'none'})\n\n"
                for r in (registered, *others)
            )
            + f"MLflow run `{registered.run_id}` in experiment `ssr-fewshot` (runs/{registered.run_id}); plots: "
            + ", ".join(f"`{name}`" for name, _ in results.figures)
            + "\n",
            description="Results table, model and plots",
        )
        print(results.markdown)
        return {
            "results": list(results.rows),
            "markdown": results.markdown,
            **registered.as_dict(),
            "registered": [r.as_dict() for r in (registered, *others)],  # one model per training query balance
        }
