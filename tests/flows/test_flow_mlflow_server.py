"""The pipeline against a real ``mlflow server`` over HTTP (SQLite backend, ``--serve-artifacts``):
the tiny few-shot flow logs its runs and registers its model there, and the registered models
are read back over HTTP (``mlflow.pyfunc``, a direct registry load, ``ssr rerank``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from ssr_tasks.config import FewShotParams
from tests.flows.test_flow_pipelines import TINY_FEWSHOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``http://127.0.0.1:<port>`` of an ``mlflow server`` with a SQLite store that serves the
    artefacts itself; stopped (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            os.path.join(bin_dir, "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            (root / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.services
def test_fewshot_pipeline_logs_and_registers_over_http(
    mlflow_server, ssr_home, ray_local, prefect_harness, glyphs_small, monkeypatch
):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    from flows.ssr_flow import ssr
    from ssr_tasks.registry import load_registered_model

    name = "ssr-fewshot-http"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = FewShotParams(
        **{**TINY_FEWSHOT, "evaluation": {**TINY_FEWSHOT["evaluation"], "eval_shots": [1]}, "model_name": name}
    )
    result = ssr(pipeline="fewshot", fewshot=params)
    assert result["model_uri"] == f"models:/{name}/1" and "champion" in result["aliases"]

    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["dataset"] == "glyphs" and champion.run_id == result["run_id"]
    assert champion.source.startswith("mlflow-artifacts:/")  # stored by the server, not on this side's disk
    run = client.get_run(result["run_id"])
    assert "test_1shot_baseline" in run.data.metrics and run.data.params
    assert {a.path for a in client.list_artifacts(result["run_id"], "plots")} >= {"plots/training_curves.png"}
    # the version links to its logged model (the REST answer of a version may omit model_id: take the flow's)
    assert client.get_logged_model(champion.model_id or result["model_id"]).status == LoggedModelStatus.READY

    # mlflow.pyfunc in this process, pointed at the server by MLFLOW_TRACKING_URI
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    shapes = {spec.name: spec.shape for spec in pyfunc.metadata.get_input_schema().inputs}
    n_way, _, dim = shapes["support"]
    rng = np.random.default_rng(0)
    inputs = {
        "support": rng.standard_normal((n_way, 2, dim)).astype(np.float32),
        "query": rng.standard_normal((5, dim)).astype(np.float32),
    }
    predicted = pyfunc.predict(inputs)
    assert predicted.shape == (5,) and predicted.dtype == np.int64
    # the project's direct registry load, given the server's URI only (as in a Ray actor: no MLflow variable set)
    with monkeypatch.context() as m:
        m.delenv("MLFLOW_TRACKING_URI")
        model = load_registered_model(f"models:/{name}@champion", tracking_uri=mlflow_server)
    expected = model.predict(torch.from_numpy(inputs["support"]), torch.from_numpy(inputs["query"])).numpy()
    np.testing.assert_array_equal(predicted, expected)


@pytest.mark.slow
@pytest.mark.services
def test_rerank_reads_a_retrieval_model_over_http(mlflow_server, ray_local, tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from ssr_model import RetrievalSSR
    from ssr_model.packaged import RetrievalReranker
    from ssr_tasks.tracking import Tracker
    from storage.features import write_features
    from storage.simstore import SimilarityStore

    d, k, n_db, n_q = 12, 5, 40, 6
    meta = {"dataset": "mine", "backbone": "mine", "checkpoint_hash": "-"}
    tracker = Tracker("rerank-http", tmp_path, tracking_uri=mlflow_server)
    torch.manual_seed(0)
    with tracker.run("train"):
        reg = tracker.log_and_register(
            RetrievalReranker(RetrievalSSR(d, k, 1, lr_dni=0.5, hidden=16)),
            "ssr-retrieval-http",
            tags={"dataset": "mine", "backbone": "mine"},
            val_metric=1.0,
        )
    assert reg.aliases and reg.tracking_uri == mlflow_server
    assert not (tmp_path / "mlartifacts").exists()  # a tracking server keeps its own artefacts

    rng = np.random.default_rng(0)
    db = rng.normal(size=(n_db, d)).astype(np.float32)
    q = (db[:n_q] + 0.3 * rng.normal(size=(n_q, d))).astype(np.float32)
    write_features(
        tmp_path / "q.parquet", ids=500 + np.arange(n_q), labels=[0] * n_q, splits="query", embeddings=q, metadata=meta
    )
    write_features(
        tmp_path / "db.parquet", ids=np.arange(n_db), labels=[0] * n_db, splits="database", embeddings=db, metadata=meta
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    args = [
        "rerank",
        str(tmp_path / "q.parquet"),
        str(tmp_path / "db.parquet"),
        "--model",
        "models:/ssr-retrieval-http@champion",
        "--out",
        str(tmp_path / "out"),
        "--actors",
        "1",
        "--shard-size",
        "3",
    ]
    assert main(args) == 0, capsys.readouterr().err
    reranked = SimilarityStore(tmp_path / "out" / "reranked")
    assert reranked.is_complete() and reranked.k == k and reranked.n_queries == n_q
