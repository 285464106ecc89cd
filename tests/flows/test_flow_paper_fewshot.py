"""The paper's few-shot settings one click away: the ``paper-fewshot`` and
``evaluate-released`` deployments and the form's descriptions."""
import pytest
from pydantic import ValidationError

from flows.cli import presets
from ssr_tasks.config import FewShotParams


def test_paper_fewshot_preset_has_the_paper_settings():
    preset = presets()["paper-fewshot"]
    assert preset["pipeline"] == "fewshot"
    p = FewShotParams(**{**preset["fewshot"], "data_root": "/data/cifar-fs"})
    assert (p.hidden, p.iterations_first, p.iterations_next, p.batch_episodes, p.lr_first, p.lr_next) == (
        4096, 30_000, 10_000, 1, 0.1, 0.01)
    assert (p.val_every, p.n_val_episodes, p.n_test_episodes, p.max_steps, p.lr_dni_grid) == (
        1000, 1000, 2000, 4, [1e-3, 2e-3, 5e-3])
    assert (p.krecip_k1, p.krecip_k2, p.krecip_lambda) == ([10, 20, 30], [5, 10, 15], [0.2, 0.5, 0.8])
    assert (p.train_augment, p.backbone_checkpoint, p.n_way, p.n_shot_train, p.n_query, p.eval_shots) == (
        "online", "released", 5, 1, 15, [1, 5])
    assert p.iterations_first // 6 == 5000  # lr x0.1 at 5,000
    with pytest.raises(ValidationError, match="data_root: dataset 'cifar-fs' needs data_root"):
        FewShotParams(**preset["fewshot"])  # dataset, data_root and backbone are left to fill


def test_evaluate_released_preset():
    preset = presets()["evaluate-released"]["fewshot"]
    p = FewShotParams(**{**preset, "data_root": "/data/cifar-fs"})
    assert p.released_checkpoint and p.lr_dni_grid == [1e-3] and (p.n_val_episodes, p.n_test_episodes) == (1000, 2000)


def test_every_form_field_gives_the_papers_value():
    fields = FewShotParams.model_json_schema()["properties"]
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
    params = FewShotParams(dataset="cifar-fs", data_root=str(root), backbone="conv4-64", released_checkpoint=str(checkpoint),
                           n_query=3, eval_shots=[1], lr_dni_grid=[1e-3], n_val_episodes=4, n_test_episodes=6,
                           krecip_k1=[3], krecip_k2=[2], krecip_lambda=[0.3], model_name="ssr-fewshot-released-test")
    result = ssr(pipeline="fewshot", fewshot=params)
    methods = [r["method"] for r in result["results"]]
    assert methods[0].startswith("Baseline") and methods[1].startswith("k-reciprocal") and methods[2].startswith("SSR")
    assert result["model_uri"] == "models:/ssr-fewshot-released-test/1" and "champion" in result["aliases"]
    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result["run_id"])
    assert run.data.metrics["best_steps"] == 2 and "test_1shot_ssr_step2" in run.data.metrics
    assert not list(ssr_home.rglob("cifar-fs-conv4-64-*.pt"))  # no pretrained backbone
