"""Rule 1 of docs/architecture.md, "What is reused and when": outputs named after what they
depend on are the source of truth. A second run whose Prefect cache records are gone reuses
every output of the first (same paths, files untouched) instead of recomputing it."""

from __future__ import annotations

import shutil

import pytest

from ssr_tasks.config import FewShotParams
from tests.flows.test_flow_pipelines import TINY_FEWSHOT


@pytest.mark.slow
def test_outputs_are_reused_without_the_prefect_cache(tmp_path, monkeypatch, ray_local, prefect_harness):
    from flows.ssr_flow import ssr

    home = tmp_path / "runs"
    monkeypatch.setenv("SSR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = FewShotParams(
        **{**TINY_FEWSHOT, "evaluation": {**TINY_FEWSHOT["evaluation"], "eval_shots": [1]}, "model_name": "ssr-reuse"}
    )
    first = ssr(pipeline="fewshot", fewshot=params)
    outputs = sorted(
        p
        for pattern in (
            "backbones/*.pt",
            "fewshot/*/features-*.parquet",
            "fewshot/*/val-episodes-*.npz",
            "fewshot/*/ssr-*/trials/*/summary.json",
        )
        for p in home.glob(pattern)
    )
    assert len(outputs) >= 4, outputs
    stamps = {p: p.stat().st_mtime_ns for p in outputs}

    shutil.rmtree(home / "prefect" / "cache-keys")  # the Prefect cache is gone: only the outputs remain
    second = ssr(pipeline="fewshot", fewshot=params)
    assert [r["method"] for r in second["results"]] == [r["method"] for r in first["results"]]
    changed = [str(p) for p, t in stamps.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert changed == [], changed
