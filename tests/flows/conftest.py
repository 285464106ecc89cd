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
