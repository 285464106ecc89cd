"""Security: no unsafe deserialisation in the code base, local services on 127.0.0.1, Ray
token authentication kept, and no credentials in logs, MLflow params, tags or artefacts."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "ssr_tasks", "ssr_model", "storage")


def calls(pattern: str) -> list[tuple[str, int, str]]:
    """Calls matching ``pattern`` in the product packages: (file, line, the whole call text)."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(pattern, text):
                depth, end = 0, m.end()
                for end in range(m.end() - 1, len(text)):  # the call up to its closing parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                found.append(
                    (str(path.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1, text[m.start() : end + 1])
                )
    return found


def test_no_unsafe_deserialisation_in_the_code_base():
    bad = []
    bad += [c for c in calls(r"\bpickle\.loads?\(")]  # only the restricted unpickler may read pickles
    bad += [c for c in calls(r"\btorch\.load\(") if "weights_only=True" not in c[2]]
    bad += [c for c in calls(r"\byaml\.load\(") if "SafeLoader" not in c[2]]
    bad += [c for c in calls(r"\bnp\.load\(") if re.search(r"allow_pickle\s*=\s*True", c[2])]
    bad += [c for c in calls(r"\b(?:cloudpickle|dill|joblib)\.loads?\(")]
    bad += [c for c in calls(r"\bsubprocess\.\w+\(") if "shell=True" in c[2]]
    assert not bad, "unsafe calls:\n" + "\n".join(f"{f}:{line}: {text}" for f, line, text in bad)
    # the scan does find what it looks for
    assert any("weights_only=True" in c[2] for c in calls(r"\btorch\.load\("))
    assert any(c[0] == "storage/safe_pickle.py" for c in calls(r"Unpickler\("))


def test_local_services_bind_127_0_0_1(tmp_path, monkeypatch):
    from flows import local_services

    spawned, ran = {}, []
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(local_services, "_spawn", lambda name, cmd, run_dir, env: spawned.__setitem__(name, (cmd, env)))
    monkeypatch.setattr(local_services, "wait_http", lambda *a, **k: None)
    if hasattr(local_services, "wait_pool_ready"):
        monkeypatch.setattr(local_services, "wait_pool_ready", lambda *a, **k: None)
    monkeypatch.setattr(local_services.subprocess, "run", lambda cmd, **k: ran.append(cmd))
    addresses = local_services.start(tmp_path)
    assert set(spawned) == {"prefect-server", "prefect-worker", "mlflow-ui"}
    server_cmd, server_env = spawned["prefect-server"]
    assert server_cmd[server_cmd.index("--host") + 1] == "127.0.0.1"
    assert server_env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    ui_cmd, _ = spawned["mlflow-ui"]
    assert ui_cmd[ui_cmd.index("--host") + 1] == "127.0.0.1"
    for url in (addresses["prefect_api"], addresses["prefect_ui"], addresses["mlflow_ui"]):
        assert url.startswith("http://127.0.0.1:"), url
    assert not any("0.0.0.0" in " ".join(map(str, c)) for c, _ in spawned.values())


def test_local_ray_keeps_token_authentication_and_no_dashboard(ray_local):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    mode = ray_local.get(ray_local.remote(num_cpus=0)(lambda: os.environ.get("RAY_AUTH_MODE")).remote())
    assert mode == "token"  # workers run with token auth too
    assert not any(p.get("DashboardPort") for p in ray_local.nodes() if isinstance(p, dict) and "DashboardPort" in p)


def _listening_ports_of_descendants() -> list[tuple[str, int, str]]:
    """(address, port, process) of TCP sockets listening in this process and its descendants."""
    me, pids = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = p = int(d.name)
        for _ in range(20):
            if p == me:
                pids.add(pid)
                break
            try:
                p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
            if p <= 1:
                break
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                name = Path(f"/proc/{inodes[f[9]]}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                out.append((addr, int(port, 16), name))
    return out


@pytest.mark.xfail(
    reason="Ray 2.60 resolves the 127.0.0.1 node address to the machine's address and its gRPC "
    "servers (GCS, raylet, workers, agents) listen on all interfaces; token auth guards them",
    strict=False,
)
def test_local_ray_listens_on_loopback_only(ray_local):
    loopback = {"0100007F", "00000000000000000000000001000000"}
    wide = [(a, p, n) for a, p, n in _listening_ports_of_descendants() if a not in loopback]
    assert not wide, f"sockets listening beyond loopback: {wide}"


def test_passwords_are_masked_and_never_logged_as_params(tmp_path, monkeypatch):
    from ssr_tasks.config import FewShotParams, RetrievalParams
    from ssr_tasks.services import ServiceUnreachable
    from ssr_tasks.tracking import Tracker, flatten

    with pytest.raises(ServiceUnreachable) as exc:
        Tracker("x", tmp_path, tracking_uri="http://alice:s3cret-pw@127.0.0.1:9/")
    assert "s3cret-pw" not in str(exc.value) and "alice:***@" in str(exc.value)
    tracker = Tracker("x", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.uri = "http://alice:s3cret-pw@mlflow.example:5000"
    assert tracker.safe_uri == "http://alice:***@mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-pw@mlflow.example:5000")
    for params in (FewShotParams(), RetrievalParams()):
        flat = flatten(params.model_dump())
        assert not any("s3cret" in v or "tracking" in k.lower() for k, v in flat.items())


TINY_FEWSHOT = dict(
    data=dict(dataset="glyphs", glyphs_size="small"),
    backbone=dict(pretrain_epochs=1),
    train=dict(max_steps=1, hidden=16, iterations_first=4, iterations_next=2, val_every=2),
    sweep={"lr_dni": [1e-3]},
    # the paper's rows only: the peers' rows log through the same code (test_flow_pipelines runs them)
    evaluation=dict(n_val_episodes=5, n_test_episodes=10, eval_shots=[1], methods=["baseline", "k-reciprocal", "ssr"]),
    baselines=dict(krecip_k1=[10], krecip_k2=[5], krecip_lambda=[0.3]),
    model_name="ssr-security-check",
)


@pytest.mark.slow
def test_a_run_writes_no_secret_to_mlflow_artifacts_or_logs(
    ssr_home, ray_local, prefect_harness, glyphs_small, tmp_path, monkeypatch, capfd, caplog
):
    from flows.ssr_flow import ssr
    from ssr_tasks.config import FewShotParams

    secret = "hunter2-do-not-log"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SSR_TEST_API_KEY", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("PREFECT_API_KEY", secret)
    result = ssr(pipeline="fewshot", fewshot=FewShotParams(**TINY_FEWSHOT))
    assert result["model_uri"].startswith("models:/ssr-security-check/")

    db = sqlite3.connect(tmp_path / "mlflow.db")
    for table in ("params", "tags", "model_version_tags", "registered_model_tags", "experiment_tags"):
        for row in db.execute(f"SELECT * FROM {table}"):
            assert secret not in " ".join(map(str, row)), (table, row)
    run_artifacts = db.execute("SELECT artifact_uri FROM runs").fetchall()
    db.close()
    for (uri,) in run_artifacts:
        root = Path(uri.removeprefix("file://"))
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err and secret not in caplog.text
