"""Start and stop the local services of the embedded default, all on 127.0.0.1.

Prefect server (SQLite under the run folder), a process worker on pool ``ssr-process``,
and the MLflow UI over the run folder's SQLite store. PIDs and logs live in
``<run dir>/services``. When ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` point at
existing servers, those are used and nothing is started for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ssr_tasks.config import default_run_dir
from ssr_tasks.services import mlflow_artifact_root, mlflow_tracking_uri

HOST = "127.0.0.1"
PREFECT_PORT = int(os.environ.get("SSR_PREFECT_PORT", "4200"))
MLFLOW_PORT = int(os.environ.get("SSR_MLFLOW_PORT", "5000"))
POOL = "ssr-process"
PROJECT_DIR = Path(__file__).resolve().parent.parent


def prefect_api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or f"http://{HOST}:{PREFECT_PORT}/api"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _service_dir(run_dir: Path) -> Path:
    d = run_dir / "services"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid_file: Path) -> bool:
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _spawn(name: str, cmd: list[str], run_dir: Path, env: dict) -> None:
    sdir = _service_dir(run_dir)
    pid_file = sdir / f"{name}.pid"
    if _alive(pid_file):
        return
    log = open(sdir / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR, start_new_session=True)
    pid_file.write_text(str(proc.pid))


def wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s ({last})")


def _pool_exists(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/work_pools/{POOL}", timeout=10) as resp:
            return resp.status == 200
    except OSError:  # HTTPError 404 included
        return False


def wait_pool_ready(api_url: str, timeout: float) -> None:
    """Return once the worker has polled, so deployments show Ready (not Not Ready) in the UI."""
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/work_pools/{POOL}", timeout=5) as resp:
                status = json.load(resp).get("status")
            if status == "READY":
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(
        f"work pool {POOL} at {api_url} is {status} after {timeout:.0f} s: is the worker running? "
        "(see its log under <run dir>/services/prefect-worker.log)"
    )


def service_env(run_dir: Path) -> dict:
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api_url()
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ssr_tasks,flows")
    env["SSR_HOME"] = str(run_dir)
    env.setdefault("MLFLOW_TRACKING_URI", mlflow_tracking_uri(run_dir))
    return env


def start(run_dir: Path | None = None, worker: bool = True, mlflow_ui: bool = True, deploy: bool = True) -> dict:
    """Start what is missing; returns the addresses."""
    run_dir = run_dir or default_run_dir()
    env = service_env(run_dir)
    addresses = {"prefect_api": env["PREFECT_API_URL"], "prefect_ui": env["PREFECT_API_URL"].removesuffix("/api")}
    own_server = not os.environ.get("PREFECT_API_URL")
    if own_server:
        server_env = {
            **env,
            "PREFECT_HOME": str(run_dir / "prefect"),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(PREFECT_PORT),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": env["PREFECT_API_URL"],
        }
        _spawn(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(PREFECT_PORT)],
            run_dir,
            server_env,
        )
    wait_http(env["PREFECT_API_URL"] + "/health", 120, "Prefect server")
    # On a server this command did not start, pools and deployments belong to someone else:
    # the pool is created only when missing, and deployments are left to `prefect deploy`.
    if own_server or not _pool_exists(env["PREFECT_API_URL"]):
        subprocess.run(
            [_bin("prefect"), "work-pool", "create", POOL, "--type", "process"]
            + (["--overwrite"] if own_server else []),
            env=env,
            check=True,
            capture_output=True,
            cwd=PROJECT_DIR,
        )
        # One flow run at a time on this machine's pool: each starts a local Ray sized to the
        # machine (runs of other deployments queue too). SSR_POOL_CONCURRENCY=N allows N; 0: no limit.
        limit = int(os.environ.get("SSR_POOL_CONCURRENCY", "1"))
        if limit > 0:
            subprocess.run(
                [_bin("prefect"), "work-pool", "set-concurrency-limit", POOL, str(limit)],
                env=env,
                check=True,
                capture_output=True,
                cwd=PROJECT_DIR,
            )
    if deploy and own_server:
        subprocess.run(
            [_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
            env=env,
            check=True,
            capture_output=True,
            cwd=PROJECT_DIR,
        )
    elif deploy:
        addresses["deployments"] = (
            "not changed on this server (run `prefect deploy --all --prefect-file deploy/prefect.yaml`)"
        )
    if worker:
        _spawn(
            "prefect-worker", [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process"], run_dir, env
        )
        wait_pool_ready(env["PREFECT_API_URL"], 120)
    if mlflow_ui and not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        (run_dir / "mlartifacts").mkdir(parents=True, exist_ok=True)
        _spawn(
            "mlflow-ui",
            [
                _bin("mlflow"),
                "ui",
                "--host",
                HOST,
                "--port",
                str(MLFLOW_PORT),
                "--backend-store-uri",
                env["MLFLOW_TRACKING_URI"],
                "--default-artifact-root",
                mlflow_artifact_root(run_dir),
            ],
            run_dir,
            env,
        )
        addresses["mlflow_ui"] = f"http://{HOST}:{MLFLOW_PORT}"
    addresses["mlflow_tracking_uri"] = env["MLFLOW_TRACKING_URI"]
    return addresses


def stop(run_dir: Path | None = None) -> list[str]:
    """Stop the services this run folder started (process groups, TERM then KILL)."""
    sdir = _service_dir(run_dir or default_run_dir())
    stopped = []
    for pid_file in sorted(sdir.glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)
        stopped.append(pid_file.stem)
    return stopped
