"""A Dirichlet run of the few-shot flow on the tiny glyphs: SSR trained both ways (two rows,
two registered models with their own champions) and SSR composed with PT-MAP (issue 21)."""

from __future__ import annotations

import csv

import pytest

from ssr_tasks.config import FewShotParams
from tests.flows.test_flow_pipelines import TINY_FEWSHOT


@pytest.mark.slow
def test_dirichlet_flow_has_ssr_trained_both_ways(ssr_home, ray_local, prefect_harness, glyphs_small, tmp_path):
    import mlflow
    import mlflow.artifacts

    from flows.ssr_flow import ssr

    params = FewShotParams(
        **{
            **TINY_FEWSHOT,
            "evaluation": {
                **TINY_FEWSHOT["evaluation"],
                "eval_shots": [1],
                "query_balance": "dirichlet:2",
                # ssr+tim takes the same path; its CPU memory profile of TIM's 1,000 steps is slow
                "methods": ["baseline", "ssr", "pt-map", "ssr+pt-map"],
            },
            "model_name": "ssr-dirichlet-flow",
        }
    )
    result = ssr(pipeline="fewshot", fewshot=params)
    methods = [r["method"] for r in result["results"]]
    assert methods[1].startswith("SSR (trained balanced, steps=")
    assert methods[2].startswith("SSR (trained Dirichlet α=2, steps=")
    assert methods[3].startswith("PT-MAP") and methods[4].startswith("SSR + PT-MAP")
    assert {r["queries"] for r in result["results"]} == {"Dirichlet α=2"}
    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    table = mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="results/results.csv", tracking_uri=uri, dst_path=str(tmp_path)
    )
    with open(table) as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == methods

    # two registered models, each the champion of its own name
    names = [r["name"] for r in result["registered"]]
    assert names == ["ssr-dirichlet-flow", "ssr-dirichlet-flow-dirichlet2"]
    assert all("champion" in r["aliases"] for r in result["registered"])
    tags = [client.get_model_version_by_alias(n, "champion").tags for n in names]
    assert [t["query_balance"] for t in tags] == ["balanced", "dirichlet:2"]
    metrics = client.get_run(result["run_id"]).data.metrics
    assert any(k.startswith("test_1shot_ssr_dirichlet2_step") for k in metrics)
    assert "test_1shot_ssr_pt_map" in metrics and metrics["test_1shot_ssr_pt_map_ms_per_episode"] > 0
    nested = client.search_runs(
        [client.get_run(result["run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert sorted(r.info.run_name for r in nested) == [
        "trial lr_dni=0.1,query_balance=balanced",
        "trial lr_dni=0.1,query_balance=dirichlet:2",
    ]
