"""Prefect deployment steps of deploy/prefect.yaml."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def project_directory() -> dict[str, str]:
    """Pull step: run in the project folder (``SSR_PROJECT_DIR`` when set, read on the
    worker when the run starts; else the folder this package is installed from), so a
    plain ``prefect deploy --all --prefect-file deploy/prefect.yaml`` needs no variable."""
    directory = Path(os.environ.get("SSR_PROJECT_DIR") or PROJECT_DIR).expanduser().resolve()
    if not (directory / "flows" / "ssr_flow.py").is_file():
        raise FileNotFoundError(f"SSR_PROJECT_DIR={directory}: expected the project folder (with flows/ssr_flow.py)")
    os.chdir(directory)
    return {"directory": str(directory)}
