"""The few-shot results: table and plots on disk (a Prefect task), then MLflow tracking and
the registered model (plain code run in the flow, inside its open MLflow run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect import task

from ssr_model.baselines.peers import COMPOSED_METHODS
from ssr_model.metrics import accuracy_ci95
from ssr_model.packaged import FewShotClassifier
from ssr_tasks import reporting
from ssr_tasks.backbone import load_backbone
from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot.evaluate import EPISODES_PER_CALL
from ssr_tasks.fewshot.handoffs import FewShotTrials, KReciprocal, ShotResult, ssr_key, trained_for
from ssr_tasks.handoffs import Backbone, RegisteredModel
from ssr_tasks.reporting import ResultsReport
from ssr_tasks.tracking import Tracker

MODEL_DESCRIPTION = (
    "SSR transductive few-shot classifier (backbone + FewShotSSR). mlflow.pyfunc: "
    '{"support": float32 (n_way, n_shot, D), "query": float32 (n, D)} features -> class ids (n,), any n >= 1; '
    "mlflow.pytorch.load_model gives the nn.Module (predict, classify_images). Each version's description is its results table."
)


@task(name="report-fewshot")
def write_report(
    params: FewShotParams, trials: FewShotTrials, krecip: KReciprocal, shots: Sequence[ShotResult], out_dir: str
) -> ResultsReport:
    """Results table (the rows of ``params.methods``: Baseline / k-reciprocal / SSR / peers;
    the query balance; per shot count accuracy, ms per episode and the peak MiB of one call
    on E episodes, E in the header) and plots."""
    base_shot = params.train.n_shot
    balances = trained_balances(params, trials)
    best_steps = trained_for(trials, base_shot, base_shot, balances[0]).best_steps
    per_shot = {r.shot: r.accuracies() for r in shots}
    costs = {r.shot: {c.key: (c.ms_per_episode, c.peak_mib_per_episode) for c in r.cost} for r in shots}
    ev = params.evaluation
    cost_episodes = min(EPISODES_PER_CALL, ev.n_test_episodes)  # the episodes of one evaluation call
    ssr = ssr_rows(params, trials, balances)
    rows = reporting.fewshot_rows(
        per_shot, krecip.label, best_steps, ev.methods, costs, ev.query_balance, cost_episodes, ssr
    )
    columns = ["method", "queries"] + [
        col
        for s in ev.eval_shots
        for col in (f"{s}-shot acc (%)", f"{s}-shot ms/episode", reporting.peak_column(s, cost_episodes))
    ]
    points = []
    for name in ev.methods:
        specs = ssr if name == "ssr" else [reporting.fewshot_method_row(name, krecip.label, best_steps)]
        for label, key, cost_key in specs:
            points += [(label, s, per_shot[s][key], costs[s][cost_key][0]) for s in per_shot if cost_key in costs[s]]
    figures = {
        "accuracy_by_step.png": reporting.plot_accuracy_by_step(per_shot, best_steps),
        "training_curves.png": reporting.plot_training_curves(trials.trials),
        "accuracy_vs_cost.png": reporting.plot_accuracy_vs_cost(
            points,
            f"{params.data.dataset}, {params.backbone.name}, {params.train.n_way}-way, queries "
            f"{reporting.queries_label(ev.query_balance)}",
        ),
    }
    notes = []
    composed = [m for m in ev.methods if m in COMPOSED_METHODS]
    if composed and len(balances) > 1:
        used_balance = ev.query_balance if ev.query_balance in balances else balances[0]
        notes.append(
            f"{', '.join(composed)}: TIM / PT-MAP on the refined features of SSR trained {trained_label(used_balance)}."
        )
    if len({t.config.n_shot for t in trials.trials}) > 1:  # a sweep over n_shot: say which model each column used
        used = {s: trained_for(trials, s, base_shot) for s in ev.eval_shots}
        notes.append(
            "SSR per column: "
            + "; ".join(
                f"{s}-shot: trained at {t.config.n_shot} shots ({t.label}, steps={t.best_steps})"
                for s, t in used.items()
            )
            + "."
        )
    return reporting.write_report(rows, columns, figures, Path(out_dir), notes)


def trained_balances(params: FewShotParams, trials: FewShotTrials) -> list[str]:
    """The query balances the run's SSR models were trained with, primary first
    (``FewShotParams.training_balances``; a released model: its own, balanced)."""
    have = {t.config.trained_balance for t in trials.trials}
    return [b for b in params.training_balances if b in have] or [trials.trials[0].config.trained_balance]


def trained_label(query_balance: str) -> str:
    """ "balanced" or "Dirichlet α=ALPHA" (how an SSR model was trained)."""
    return reporting.queries_label(query_balance)


def ssr_rows(params: FewShotParams, trials: FewShotTrials, balances: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, accuracy key, cost key) of each SSR model of the run. One model trained balanced
    and tested on balanced queries keeps the row "SSR (steps=S)"; otherwise each row says how it
    was trained: "SSR (trained balanced, steps=S)", "SSR (trained Dirichlet α=2, steps=S)"."""
    base_shot = params.train.n_shot
    named = len(balances) > 1 or balances[0] != "balanced" or params.evaluation.query_balance != "balanced"
    rows = []
    for i, balance in enumerate(balances):
        steps = trained_for(trials, base_shot, base_shot, balance).best_steps
        label = f"SSR (trained {trained_label(balance)}, steps={steps})" if named else f"SSR (steps={steps})"
        key = "ssr" if i == 0 else ssr_key(balance)
        rows.append((label, f"{key}_step{steps}", key))
    return rows


def log_and_register(
    tracker: Tracker,
    params: FewShotParams,
    trials: FewShotTrials,
    krecip: KReciprocal,
    shots: Sequence[ShotResult],
    report: ResultsReport,
    backbone: Backbone | None,
    tags: Mapping[str, str],
) -> tuple[RegisteredModel, ...]:
    """Into the open parent run: a nested run per trial, metrics, table, plots, and the
    registered model (SSR + backbone), aliased ``champion`` when it wins on validation: one
    per query balance SSR was trained with (``FewShotParams.registered_name``), the primary
    first."""
    for trial in trials.trials:
        with tracker.trial_run(f"trial {trial.label}", trial.label, tags) as live:
            if not live:  # a live run has its point's parameters already
                tracker.log_params(trial.config.model_dump())
            offset = 0
            for stage in trial.stages if not live else ():  # a live run has its curves already
                for h in stage.history:
                    tracker.log_metrics(
                        {"val_acc": 100 * h.val_acc, "loss": h.loss, "steps": stage.steps}, step=offset + h.iteration
                    )
                offset += stage.history[-1].iteration if stage.history else 0
            tracker.log_metrics({"best_val_acc": 100 * trial.best_val, "best_steps": trial.best_steps})
    balances = trained_balances(params, trials)
    n_shot = params.train.n_shot
    # registered: the model of the train group's shots, one per query balance of training, primary first
    models = [(b, trained_for(trials, n_shot, n_shot, b)) for b in balances]
    best = models[0][1]
    metrics = {
        "best_val_acc": 100 * best.best_val,
        "best_steps": best.best_steps,
        "krecip_k1": krecip.k1,
        "krecip_k2": krecip.k2,
        "krecip_lambda": krecip.lam,
    }
    for balance, trial in models[1:]:
        metrics[f"best_val_acc_{ssr_key(balance)}"] = 100 * trial.best_val
        metrics[f"best_steps_{ssr_key(balance)}"] = trial.best_steps
    for res in shots:
        for key, accs in res.accuracies().items():
            mean, ci = accuracy_ci95(accs)
            metrics[f"test_{res.shot}shot_{key}"] = mean
            metrics[f"test_{res.shot}shot_{key}_ci95"] = ci
        for cost in res.cost:
            metrics[f"test_{res.shot}shot_{cost.key}_ms_per_episode"] = cost.ms_per_episode
            metrics[f"test_{res.shot}shot_{cost.key}_peak_mib_per_episode"] = cost.peak_mib_per_episode
            metrics[f"test_{res.shot}shot_{cost.key}_cpu_ms_per_episode"] = cost.cpu_ms_per_episode
        metrics[f"test_{res.shot}shot_repeated_query_fraction"] = res.repeated_queries
    tracker.log_metrics(metrics)
    tracker.log_file(Path(report.csv), "results")
    tracker.log_file(Path(report.md), "results")
    for _, path in report.figures:
        tracker.log_file(Path(path), "plots")
    # embeddings given (dataset: features): the model classifies features, it has no backbone
    net = load_backbone(backbone.name, backbone.spec, Path(backbone.path)).cpu().eval() if backbone else None
    registered = []
    for balance, trial in models:
        reg = tracker.log_and_register(
            FewShotClassifier(trial.model.build(), net),
            params.registered_name(balance),
            tags={
                "dataset": params.data.dataset,
                "backbone": params.backbone.name if backbone else "none",
                "steps": str(trial.best_steps),
                "feat_dim": str(trial.feat_dim),
                "n_shot": str(trial.config.n_shot),
                "query_balance": balance,  # registry.KIND_TAGS: models trained so compete only among themselves
                "val_metric_name": "val_acc_1shot" if balance == "balanced" else f"val_acc_1shot_{ssr_key(balance)}",
            },
            val_metric=100 * trial.best_val,
            description=f"{params.data.dataset}, {params.backbone.name}, SSR trained on {trained_label(balance)} "
            f"query sets: test accuracy (%, 95% CI)\n\n{report.markdown}",
            model_description=MODEL_DESCRIPTION,
        )
        registered.append(reg)
    tracker.log_metrics({"registered_version": registered[0].version})
    for balance, reg in zip(balances[1:], registered[1:]):
        tracker.log_metrics({f"registered_version_{ssr_key(balance)}": reg.version})
    return tuple(registered)
