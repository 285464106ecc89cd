"""Registered models are servable: pyfunc with dict inputs, a fresh process without the
project, and ``mlflow models serve --env-manager local`` answering ``POST /invocations``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest
import torch

from ssr_model import FewShotSSR
from ssr_model.packaged import FewShotClassifier, RetrievalReranker
from ssr_model.retrieval import RetrievalSSR
from ssr_tasks.tracking import Tracker

D, N_WAY, N_QUERY, K = 8, 3, 4, 5


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Both kinds registered in one SQLite store; the few-shot run also has test metrics."""
    root = tmp_path_factory.mktemp("serving")
    tracker = Tracker("serving", root, tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    fewshot = FewShotClassifier(FewShotSSR(D, N_WAY, N_QUERY, steps=1, lr_dni=0.1, hidden=8)).eval()
    reranker = RetrievalReranker(RetrievalSSR(D, K, steps=1, lr_dni=0.1, hidden=8)).eval()
    with tracker.run("fewshot"):
        tracker.log_metrics({"test_1shot_ssr": 61.5})
        fs = tracker.log_and_register(
            fewshot,
            "fs",
            {"dataset": "d", "backbone": "b"},
            val_metric=1.0,
            description="| method | acc |\n|---|---|\n| SSR | 61.5 |",
            model_description="SSR few-shot classifier",
        )
    with tracker.run("retrieval"):
        rt = tracker.log_and_register(reranker, "rt", {"dataset": "d", "backbone": "b"}, val_metric=1.0)
    return {
        "root": root,
        "uri": tracker.uri,
        "client": tracker.client,
        "fewshot": (fewshot, fs),
        "retrieval": (reranker, rt),
    }


def _fewshot_input(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "support": rng.standard_normal((N_WAY, 2, D)).astype(np.float32),
        "query": rng.standard_normal((n, D)).astype(np.float32),
    }


def _retrieval_input(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "query": rng.standard_normal((2, D)).astype(np.float32),
        "neighbours": rng.standard_normal((2, K, D)).astype(np.float32),
    }


def _expected_fewshot(model, inputs) -> np.ndarray:
    return model.predict(torch.from_numpy(inputs["support"]), torch.from_numpy(inputs["query"])).numpy()


def _expected_order(model, inputs) -> np.ndarray:
    positions = torch.arange(K).expand(2, K)
    order, _ = model.rerank(torch.from_numpy(inputs["query"]), torch.from_numpy(inputs["neighbours"]), positions)
    return order.numpy()


def test_pyfunc_takes_dicts_with_any_number_of_queries(registry, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    fewshot, _ = registry["fewshot"]
    pyfunc = mlflow.pyfunc.load_model("models:/fs@champion")
    for n in (1, N_QUERY, 2 * N_QUERY + 1):
        inputs = _fewshot_input(n, seed=n)
        out = pyfunc.predict(inputs)
        assert out.shape == (n,) and out.dtype == np.int64
        np.testing.assert_array_equal(out, _expected_fewshot(fewshot, inputs))
    reranker, _ = registry["retrieval"]
    inputs = _retrieval_input()
    np.testing.assert_array_equal(
        mlflow.pyfunc.load_model("models:/rt@champion").predict(inputs), _expected_order(reranker, inputs)
    )
    # mlflow.pytorch keeps giving the nn.Module with its methods
    assert isinstance(mlflow.pytorch.load_model("models:/fs@champion"), FewShotClassifier)


def test_version_has_signature_example_description_and_linked_metrics(registry, monkeypatch):
    from mlflow.models import get_model_info

    _, fs = registry["fewshot"]
    client = registry["client"]
    version = client.get_model_version("fs", str(fs.version))
    assert "| SSR | 61.5 |" in version.description
    assert client.get_registered_model("fs").description == "SSR few-shot classifier"
    assert {m.key for m in client.get_logged_model(fs.model_id).metrics} >= {"test_1shot_ssr"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    info = get_model_info("models:/fs@champion")
    inputs = {spec.name: spec.shape for spec in info.signature.inputs.inputs}
    assert inputs == {"support": (N_WAY, -1, D), "query": (-1, D)}
    assert info.saved_input_example_info is not None
    assert info.flavors["python_function"]["loader_module"] == "ssr_pyfunc"


def test_fresh_process_without_the_project_loads_the_model(registry, tmp_path):
    """The project's import paths and its editable-install finder are removed: ssr_model
    must come from the model's own code folder."""
    script = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {str(os.getcwd())!r})]
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import importlib.util
        assert importlib.util.find_spec("ssr_tasks") is None, "the project is still importable"
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/fs@champion")
        rng = np.random.default_rng(0)
        out = model.predict({{"support": rng.standard_normal(({N_WAY}, 2, {D})).astype(np.float32),
                              "query": rng.standard_normal((7, {D})).astype(np.float32)}})
        import ssr_model
        print("OK", out.shape, ssr_model.__file__)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("OK (7,)") and os.getcwd() not in last.split(" ", 2)[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.services
@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registry, tmp_path):
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` starts `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry["uri"],
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [
            os.path.join(bin_dir, "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/fs@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        inputs = _fewshot_input(6, seed=3)
        body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            predictions = json.load(resp)["predictions"]
        np.testing.assert_array_equal(np.asarray(predictions), _expected_fewshot(registry["fewshot"][0], inputs))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
