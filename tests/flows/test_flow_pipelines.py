"""The `ssr` flow end to end under the shared Prefect harness, tiny sizes, real Ray and MLflow (SQLite)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssr_tasks.config import FewShotParams, RetrievalParams
from storage.features import read_features
from storage.simstore import SimilarityStore

ROOT = Path(__file__).resolve().parents[2]

TINY_FEWSHOT = dict(
    data=dict(dataset="glyphs", glyphs_size="small"),
    backbone=dict(pretrain_epochs=1),
    train=dict(max_steps=2, hidden=32, iterations_first=6, iterations_next=4, val_every=3),
    sweep={"lr_dni": [0.1]},
    evaluation=dict(n_val_episodes=10, n_test_episodes=20, eval_shots=[1, 5]),
    baselines=dict(krecip_k1=[10], krecip_k2=[5], krecip_lambda=[0.3]),
    model_name="ssr-fewshot",
)
TINY_RETRIEVAL = dict(
    # 200 rendered distractors appended to the 500-item test database (issue 20, item 4)
    data=dict(glyphs_size="small", holdout_fraction=0.3, distractors=200),
    backbone=dict(pretrain_epochs=1),
    # 30 iterations at lr 0.01: enough for SSR to beat its untrained start on validation, so the champion moves
    train=dict(
        k=10, hidden=32, sequence_length=100, iterations=30, val_every=10, batch_queries=4, lr=0.01, n_val_queries=10
    ),
    sweep={"lr_dni": [0.1]},
    evaluation=dict(shard_size=8),
    baselines=dict(qe_n_grid=[1, 3], krecip_pairs=[(10, 5)], krecip_lambda=[0.3]),
    model_name="ssr-retrieval",
)


def readme_snippet(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- snippet:{name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet {name}"
    return m.group(1)


def run_snippet_fresh(name: str, ssr_home: Path) -> str:
    """Run a README snippet in a fresh Python process, from a folder where ./runs is the run folder."""
    cwd = ssr_home.parent / f"{ssr_home.name}-cwd"
    cwd.mkdir(exist_ok=True)
    if not (cwd / "runs").exists():
        (cwd / "runs").symlink_to(ssr_home)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SSR_HOME")}
    out = subprocess.run(
        [sys.executable, "-c", readme_snippet(name)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_fewshot_flow_end_to_end(ssr_home, ray_local, prefect_harness, glyphs_small):
    from prefect.client.orchestration import get_client

    from flows.ssr_flow import ssr

    result = ssr(pipeline="fewshot", fewshot=FewShotParams(**TINY_FEWSHOT))
    methods = [r["method"] for r in result["results"]]
    assert methods[0].startswith("Baseline") and methods[1].startswith("k-reciprocal") and methods[2].startswith("SSR")
    assert set(result["results"][0]) == {"method", "queries"} | {
        f"{s}-shot {what}" for s in (1, 5) for what in ("acc (%)", "ms/episode", "peak MiB (E=20)")
    }
    assert [r["method"].split()[0] for r in result["results"][3:]] == [
        "SimpleShot",
        "BD-CSPN",
        "TIM-GD",
        "α-TIM",
        "PT-MAP",
        "LaplacianShot",
    ]
    assert result["model_uri"] == "models:/ssr-fewshot/1" and "champion" in result["aliases"]

    import mlflow

    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("ssr-fewshot", "champion")
    assert mv.tags["dataset"] == "glyphs" and mv.tags["backbone"] == "conv4-64"
    run = client.get_run(result["run_id"])
    assert run.data.tags["prefect_flow_run_id"]
    assert "test_1shot_baseline" in run.data.metrics and "test_5shot_krecip" in run.data.metrics
    assert any(k.startswith("test_5shot_ssr_step") for k in run.data.metrics)
    arts = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert arts == {"plots/accuracy_by_step.png", "plots/training_curves.png", "plots/accuracy_vs_cost.png"}
    assert "test_5shot_pt_map" in run.data.metrics and run.data.metrics["test_1shot_tim_ms_per_episode"] > 0
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(nested) == 1 and "val_acc" in nested[0].data.metrics

    with get_client(sync_client=True) as pc:
        keys = {a.key for a in pc.read_artifacts()}
    assert {"fewshot-results", "fewshot-report"} <= keys

    out = run_snippet_fresh("fewshot", ssr_home)
    assert re.search(r"predicted classes: tensor\(\[", out), out
    # A second run's reuse (no retraining, same table, champion kept) is tests/flows/test_flow_reuse.py's.


# The retrieval table's rows, in order: every method, each followed by its + SSR row.
RETRIEVAL_ROWS = [
    m
    for name in (
        "features",
        "AQE",
        "AQEwD",
        "alpha-QE",
        "DQE",
        "k-reciprocal",
        "alpha-DBA-QE",
        "diffusion",
        "GNN",
        "SuperGlobal",
    )
    for m in (name, f"{name} + SSR")
]


@pytest.mark.slow
def test_retrieval_flow_end_to_end(ssr_home, ray_local, prefect_harness, glyphs_small):
    from flows.ssr_flow import ssr

    result = ssr(pipeline="retrieval", retrieval=RetrievalParams(**TINY_RETRIEVAL))
    methods = [r["method"] for r in result["results"]]
    assert methods == RETRIEVAL_ROWS
    for row in result["results"]:
        for p in ("easy", "medium", "hard"):
            assert 0.0 <= row[f"mAP {p}"] <= 100.0
    assert result["model_uri"] == "models:/ssr-retrieval/1"
    # 200 distractors after the test database's 500 items: in the table, and among the features' top-K
    (table,) = ssr_home.rglob("retrieval-features-*-distractors-200.parquet")
    db = read_features(table, split="database")
    assert len(db) == 700 and set(db.labels[500:]) == {"distractor"} and set(db.labels[:500]) == {"db"}
    # the session's home holds other runs' stores too: this run's is the one over 700 database rows
    (store,) = [
        s
        for s in ssr_home.rglob("stores/*/features/topk")
        if len(np.load(s.parent.parent / "database.npy", mmap_mode="r")) == 700
    ]
    top = np.concatenate([s.neighbor_ids for s in SimilarityStore(store).iter_shards()])
    assert top.shape[0] == 20 and top.max() >= 500 and top.max() < 700  # distractors are ranked, as negatives
    out = run_snippet_fresh("retrieval", ssr_home)
    assert "re-ranked ids" in out
