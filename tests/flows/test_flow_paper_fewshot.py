"""The paper's few-shot settings one click away: the ``paper-fewshot`` and
``evaluate-released`` deployments and the form's descriptions."""

import pytest
from pydantic import ValidationError

from flows.cli import _merge, presets
from ssr_tasks.config import FewShotParams


def with_data_root(preset: dict, root: str) -> FewShotParams:
    """The preset's parameters with data_root filled, as ``ssr run --preset ... --set data.data_root=...`` does."""
    return FewShotParams(**_merge(preset, {"data": {"data_root": root}}))


def test_paper_fewshot_preset_has_the_paper_settings():
    preset = presets()["paper-fewshot"]
    assert preset["pipeline"] == "fewshot"
    p = with_data_root(preset["fewshot"], "/data/cifar-fs")
    t, ev, bl = p.train, p.evaluation, p.baselines
    assert (t.hidden, t.iterations_first, t.iterations_next, t.batch_episodes, t.lr_first, t.lr_next) == (
        4096,
        30_000,
        10_000,
        1,
        0.1,
        0.01,
    )
    assert (t.val_every, ev.n_val_episodes, ev.n_test_episodes, t.max_steps, p.sweep) == (
        1000,
        1000,
        2000,
        4,
        {"lr_dni": [1e-3, 2e-3, 5e-3]},
    )
    assert (bl.krecip_k1, bl.krecip_k2, bl.krecip_lambda) == ([10, 20, 30], [5, 10, 15], [0.2, 0.5, 0.8])
    assert (t.train_augment, p.backbone.checkpoint, t.n_way, t.n_shot, t.n_query, ev.eval_shots) == (
        "online",
        "released",
        5,
        1,
        15,
        [1, 5],
    )
    assert t.iterations_first // 6 == 5000  # lr x0.1 at 5,000
    with pytest.raises(ValidationError, match="data_root: dataset 'cifar-fs' needs data_root"):
        FewShotParams(**preset["fewshot"])  # dataset, data_root and backbone are left to fill


def test_evaluate_released_preset():
    preset = presets()["evaluate-released"]["fewshot"]
    p = with_data_root(preset, "/data/cifar-fs")
    assert p.backbone.released_checkpoint and p.sweep == {"lr_dni": [1e-3]}
    assert (p.evaluation.n_val_episodes, p.evaluation.n_test_episodes) == (1000, 2000)
    assert p.first_train.lr_dni == 1e-3  # the released model is evaluated with the sweep's first point


def test_every_form_field_gives_the_papers_value():
    schema = FewShotParams.model_json_schema()
    groups = {name for name, f in schema["properties"].items() if "$ref" in f or "allOf" in f}
    assert {"data", "backbone", "train", "evaluation", "baselines"} <= groups
    fields = {name: f for name, f in schema["properties"].items() if name not in groups}
    for definition in schema["$defs"].values():  # the fields of each group
        fields.update({f"{definition['title']}.{name}": f for name, f in definition.get("properties", {}).items()})
    missing = [name for name, f in fields.items() if "(paper" not in f.get("description", "")]
    assert not missing, f"fields without the paper's value in their description: {missing}"


@pytest.mark.slow
def test_released_model_published_like_a_trained_run(ssr_home, ray_local, prefect_harness, tmp_path_factory):
    """``released_checkpoint``: no pretraining, no training; the same table, MLflow run and
    registered model as a trained run."""
    import mlflow

    from flows.ssr_flow import ssr
    from tests.authors_formats import build_authors_cifar_fs

    root, checkpoint, _, _ = build_authors_cifar_fs(tmp_path_factory.mktemp("released-flow"))
    params = FewShotParams(
        data=dict(dataset="cifar-fs", data_root=str(root)),
        backbone=dict(name="conv4-64", released_checkpoint=str(checkpoint)),
        train=dict(n_query=3),
        sweep={"lr_dni": [1e-3]},
        evaluation=dict(eval_shots=[1], n_val_episodes=4, n_test_episodes=6),
        baselines=dict(krecip_k1=[3], krecip_k2=[2], krecip_lambda=[0.3]),
        model_name="ssr-fewshot-released-test",
    )
    result = ssr(pipeline="fewshot", fewshot=params)
    methods = [r["method"] for r in result["results"]]
    assert methods[0].startswith("Baseline") and methods[1].startswith("k-reciprocal") and methods[2].startswith("SSR")
    assert result["model_uri"] == "models:/ssr-fewshot-released-test/1" and "champion" in result["aliases"]
    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result["run_id"])
    assert run.data.metrics["best_steps"] == 2 and "test_1shot_ssr_step2" in run.data.metrics
    assert not list(ssr_home.rglob("cifar-fs-conv4-64-*.pt"))  # no pretrained backbone
