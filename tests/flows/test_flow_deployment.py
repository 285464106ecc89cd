"""Integration: a real Prefect server and process worker on 127.0.0.1, deployments from
deploy/prefect.yaml (registered without SSR_PROJECT_DIR: the pull step finds the project),
`prefect deployment run ssr/reproduce-fewshot-tiny --watch`, then the MLflow registry and
the Prefect artifacts are checked. The run is given the preset's parameters with only the
Baseline / k-reciprocal / SSR rows (`--params`): the peers' rows are test_flow_pipelines'
business, and the worker polls every 2 s instead of 10 (PREFECT_WORKER_QUERY_SECONDS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.services
def test_deployment_run_from_the_cli(services_env):
    from flows.cli import presets

    home, env = services_env
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker takes the run within 2 s
    fewshot = presets()["reproduce-fewshot-tiny"]["fewshot"]
    fewshot = {**fewshot, "evaluation": {**fewshot["evaluation"], "methods": ["baseline", "k-reciprocal", "ssr"]}}
    ssr_bin = str(Path(sys.executable).parent / "ssr")
    try:
        started = subprocess.run([ssr_bin, "services", "start"], env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        addrs = dict(line.split(": ", 1) for line in started.stdout.strip().splitlines())
        assert addrs["prefect_api"].startswith("http://127.0.0.1:")
        env["PREFECT_API_URL"] = addrs["prefect_api"]
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "prefect"),
                "deployment",
                "run",
                "ssr/reproduce-fewshot-tiny",
                "--params",
                json.dumps({"fewshot": fewshot}),  # Prefect merges run parameters over the deployment's by name
                "--watch",
                "--watch-interval",
                "1",
                "--watch-timeout",
                "900",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=960,
            cwd=ROOT,
        )
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        assert "Completed" in run.stdout + run.stderr

        import mlflow

        uri = f"sqlite:///{home / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri, registry_uri=uri)
        mv = client.get_model_version_by_alias("ssr-fewshot-tiny", "champion")
        assert mv.tags["dataset"] == "glyphs"
        run_params = client.get_run(mv.run_id).data.params  # the run took the preset with --params' rows
        assert run_params["evaluation.methods"] == str(["baseline", "k-reciprocal", "ssr"]), run_params
        assert run_params["evaluation.n_test_episodes"] == "20" and run_params["train.hidden"] == "32", run_params
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                "from prefect.client.orchestration import get_client\n"
                "with get_client(sync_client=True) as c:\n"
                "    print(sorted({a.key for a in c.read_artifacts()}))\n"
                "    print('pool limit', c.read_work_pool('ssr-process').concurrency_limit)",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "fewshot-results" in check.stdout and "fewshot-report" in check.stdout, check.stdout + check.stderr
        assert "fewshot-mlflow-run" in check.stdout, check.stdout  # a link artifact to the MLflow run
        assert "pool limit 1" in check.stdout, check.stdout  # one flow run at a time on the local pool
        # against a server it did not start (PREFECT_API_URL set), `ssr services start` keeps
        # the existing pool and deployments
        again = subprocess.run(
            [ssr_bin, "services", "start", "--no-worker", "--no-mlflow-ui"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0 and "deployments: not changed on this server" in again.stdout, (
            again.stdout + again.stderr
        )
    finally:
        subprocess.run([ssr_bin, "services", "stop"], env=env, capture_output=True, timeout=120)
