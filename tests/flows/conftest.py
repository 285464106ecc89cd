from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def services_env(tmp_path, glyphs_small, ssr_home):
    """(run folder, environment) for `ssr services start` on free ports, isolated from the session.

    The session's rendered dataset is linked in, so nothing is re-rendered; any configured
    servers are removed from the environment so the local ones are used.
    """
    home = tmp_path / "runs"
    home.mkdir()
    (home / "data").symlink_to(ssr_home / "data")
    env = {
        **os.environ,
        "SSR_HOME": str(home),
        "SSR_PREFECT_PORT": str(_free_port()),
        "SSR_MLFLOW_PORT": str(_free_port()),
    }
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_PROFILES_PATH", "SSR_PROJECT_DIR"):
        env.pop(key, None)
    return home, env


TINY_REUSE_METHODS = ["baseline", "k-reciprocal", "ssr"]  # the peers' rows are test_flow_pipelines' business


@pytest.fixture(scope="session")
def tiny_fewshot_twice(tmp_path_factory, ray_local, prefect_harness):
    """The tiny few-shot flow run twice in one run folder, for test_flow_reuse and test_flow_cache:
    the first run, then a second after the Prefect cache records are deleted (only the outputs
    remain). One pair of runs serves both files (their cost is one flow run each); what they
    check is recorded here, because test_flow_cache then deletes the folder and runs again.

    Returns a namespace: home, params, first and second (the flow's results), cache_keys_after_first
    (whether the cache records were in the run folder), trials_of_first (the first run's nested
    trial runs: tag, length of the ``progress`` history, metric keys, status), outputs (the
    first run's outputs named after what they depend on) and changed (those the second run
    rewrote or removed).
    """
    import shutil
    from types import SimpleNamespace

    import mlflow

    from flows.ssr_flow import ssr
    from ssr_tasks.config import FewShotParams
    from tests.flows.test_flow_pipelines import TINY_FEWSHOT

    home = tmp_path_factory.mktemp("tiny-fewshot-twice") / "runs"
    params = FewShotParams(
        **{
            **TINY_FEWSHOT,
            "evaluation": {**TINY_FEWSHOT["evaluation"], "eval_shots": [1], "methods": TINY_REUSE_METHODS},
            "model_name": "ssr-cache",
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSR_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        first = ssr(pipeline="fewshot", fewshot=params)
        cache_keys_after_first = (home / "prefect" / "cache-keys").is_dir()
        uri = f"sqlite:///{home / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri, uri)
        parent = client.get_run(first["run_id"])
        trials = [
            SimpleNamespace(
                tag=r.data.tags["ssr.trial"],
                n_progress=len(client.get_metric_history(r.info.run_id, "progress")),
                metrics=set(r.data.metrics),
                status=r.info.status,
            )
            for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}'")
        ]
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
        stamps = {p: p.stat().st_mtime_ns for p in outputs}
        shutil.rmtree(home / "prefect" / "cache-keys")  # the Prefect cache is gone: only the outputs remain
        second = ssr(pipeline="fewshot", fewshot=params)
        changed = [str(p) for p, t in stamps.items() if not p.exists() or p.stat().st_mtime_ns != t]
    return SimpleNamespace(
        home=home,
        params=params,
        first=first,
        second=second,
        cache_keys_after_first=cache_keys_after_first,
        trials_of_first=trials,
        outputs=outputs,
        changed=changed,
    )
