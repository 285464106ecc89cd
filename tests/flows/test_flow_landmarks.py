"""The real-data retrieval path end to end, from pickles in the authors' formats to the results
table: rOxford5k-format test set, SfM-120k-format training set with held-out clusters."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ssr_tasks.config import RetrievalParams
from tests.flows.test_flow_pipelines import RETRIEVAL_ROWS
from tests.landmark_pickles import write_sfm_pickle, write_test_pickle

TINY_LANDMARKS = dict(
    data=dict(dataset="roxford5k", holdout_fraction=0.2),
    train=dict(
        k=10,
        hidden=16,
        sequence_length=200,
        min_positives=2,
        iterations=4,
        val_every=2,
        batch_queries=2,
        n_val_queries=10,
    ),
    sweep={"lr_dni": [1e-2]},
    evaluation=dict(shard_size=4),
    baselines=dict(qe_n_grid=[1, 3], krecip_pairs=[(10, 5)], krecip_lambda=[0.3]),
    model_name="ssr-retrieval-landmarks",
)


def revisitop_map(query: np.ndarray, database: np.ndarray, gt: list[dict], protocol: str) -> float:
    """mAP (percent) of the plain dot-product ranking, written out from the revisitop protocol:
    query (D, Q), database (D, N) as pickled; ignored items leave the ranking, AP integrates
    precision trapezoidally, queries without positives are skipped."""
    aps = []
    for qi, g in enumerate(gt):
        ranking = list(np.argsort(-(database.T @ query[:, qi]), kind="stable"))
        easy, hard, junk = (set(g[key].tolist()) for key in ("easy", "hard", "junk"))
        positives, ignored = {"easy": (easy, junk | hard), "medium": (easy | hard, junk), "hard": (hard, junk | easy)}[
            protocol
        ]
        if not positives:
            continue
        kept = [i for i in ranking if i not in ignored]
        ap, found = 0.0, 0
        for rank, item in enumerate(kept):
            if item in positives:
                before = found / rank if rank > 0 else 1.0
                found += 1
                ap += (before + found / (rank + 1)) / 2.0 / len(positives)
        aps.append(ap)
    return 100.0 * float(np.mean(aps))


@pytest.mark.slow
def test_landmark_pickles_to_results(ssr_home, ray_local, prefect_harness, tmp_path):
    from flows.ssr_flow import ssr

    raw = write_test_pickle(tmp_path)
    write_sfm_pickle(tmp_path)
    params = RetrievalParams(**{**TINY_LANDMARKS, "data": {**TINY_LANDMARKS["data"], "data_root": str(tmp_path)}})
    result = ssr(pipeline="retrieval", retrieval=params)
    rows = {r["method"]: r for r in result["results"]}
    assert list(rows) == RETRIEVAL_ROWS
    for protocol in ("easy", "medium", "hard"):
        want = revisitop_map(raw["query"], raw["database"], raw["gt"], protocol)
        assert rows["features"][f"mAP {protocol}"] == pytest.approx(round(want, 2), abs=1e-9)
    # what validation chose is reported, the model is registered under the landmark backbone
    for key in ("lr_dni 0.01", "checkpoint_iteration", "qe_n.AQE", "krecip k1=10,k2=5,lambda=0.3"):
        assert key in result["chosen"]
    assert result["model_uri"] == "models:/ssr-retrieval-landmarks/1"
    csv_path = max(Path(ssr_home).rglob("results.csv"), key=lambda path: path.stat().st_mtime)
    with open(csv_path) as f:
        assert next(csv.reader(f)) == [
            "method",
            "mAP easy",
            "mAP medium",
            "mAP hard",
            "mP@10 medium",
            "mP@10 hard",
            "ms/query",
            "peak MiB (Q=10)",
            "CPU s",
        ]
    # issue 20: costs measured in actors for every row; every grid point's validation and test mAP beside them
    assert all(r["ms/query"] > 0 and r["CPU s"] >= 0 and r["peak MiB (Q=10)"] for r in rows.values())
    with open(csv_path.parent / "val_vs_test.csv") as f:
        vvt = list(csv.DictReader(f))
    assert {r["method"] for r in vvt} == set(rows) - {"features"} - {m for m in rows if m.endswith(" + SSR")}
    assert [r["test setting"] for r in vvt if r["method"] == "k-reciprocal"] == ["k1=10,k2=5,lambda=0.3"]
    assert all(float(r["test mAP medium"]) >= 0 and r["validation mAP medium"] for r in vvt)
    assert any(Path(ssr_home).rglob("map_vs_cost.png"))  # the accuracy-against-cost plot, also logged to MLflow
    import mlflow

    uri = f"sqlite:///{Path(ssr_home) / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["features_ms_per_query"] > 0 and metrics["k-reciprocal_plus_SSR_ms_per_query"] > 0
    assert {"GNN_peak_mib", "GNN_cpu_seconds"} <= set(metrics)
    logged = {a.path for a in client.list_artifacts(result["run_id"], "results")}
    assert {"results/val_vs_test.csv", "results/val_vs_test.md", "results/costs.csv"} <= logged


def test_paper_retrieval_preset_has_the_paper_settings():
    from pydantic import ValidationError

    from flows.cli import _merge, presets

    preset = presets()["paper-retrieval"]
    assert preset["pipeline"] == "retrieval"
    p = RetrievalParams(**_merge(preset["retrieval"], {"data": {"data_root": "/data/landmark"}}))
    t, bl = p.train, p.baselines
    assert (p.data.dataset, t.k, t.steps, t.hidden, p.sweep) == (
        "roxford5k",
        100,
        1,
        1024,
        {"lr_dni": [1e-4, 2e-4, 5e-4]},
    )
    assert (t.iterations, t.val_every, t.batch_queries, t.lr, t.sequence_length, t.min_positives, t.max_ap) == (
        60_000,
        1000,
        1,
        1e-3,
        1000,
        5,
        0.8,
    )
    assert (p.data.holdout_fraction, bl.qe_n_grid, bl.krecip_pairs, bl.krecip_lambda) == (
        0.05,
        [1, 3, 5, 7, 9],
        [(40, 20), (80, 40), (160, 80)],
        [0.1, 0.3, 0.5],
    )
    with pytest.raises(ValidationError, match="data_root: dataset 'roxford5k' needs data_root"):
        RetrievalParams(**preset["retrieval"])  # only dataset and data_root are left to fill


def test_bad_pickles_one_line_exit_2_before_the_flow(ssr_home, tmp_path, capsys):
    """`ssr run retrieval` imports the pickles before the flow starts: bad input is one line, exit 2."""
    import pickle

    from flows.cli import main

    cache = ssr_home / "data" / "landmarks"
    raw = write_test_pickle(tmp_path)
    sfm = write_sfm_pickle(tmp_path)
    run = ["run", "retrieval", "--set", "data.dataset=roxford5k", "--set", f"data.data_root={tmp_path}"]

    def expect(message):
        before = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
        assert main(run) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        # nothing partial: no temporary folder left, no new cache entry for the bad file
        after = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
        assert not [n for n in after if n.startswith(".")] and set(after) - set(before) <= {
            n for n in after if "roxford5k" in n
        }

    (tmp_path / "gl18_resnet101_sfm120k.pkl").write_bytes(pickle.dumps({"database": sfm["database"]}))
    expect("gl18_resnet101_sfm120k.pkl: missing key 'cluster'")
    (tmp_path / "gl18_resnet101_sfm120k.pkl").write_bytes(pickle.dumps({**sfm, "database": sfm["database"][:20]}))
    expect("gl18_resnet101_sfm120k.pkl: database has D=20, but the test features have D=32")
    bad_query = {**raw, "query": raw["query"][:20]}
    (tmp_path / "gl18_resnet101_rparis6k.pkl").write_bytes(pickle.dumps(bad_query))
    run[3] = "data.dataset=rparis6k"
    expect(
        "gl18_resnet101_rparis6k.pkl: 'query' is (20, 10) and 'database' is (32, 120): query and database features "
        "must have the same D"
    )
    out_of_range = {**raw, "gt": [{**g, "junk": np.array([120])} for g in raw["gt"]]}
    (tmp_path / "gl18_resnet101_rparis6k.pkl").write_bytes(pickle.dumps(out_of_range))
    expect("gl18_resnet101_rparis6k.pkl['gt']: query 0: field 'junk' has index 120 outside [0, 120)")
