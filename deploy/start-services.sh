#!/usr/bin/env bash
# Start (or stop) the local services of the embedded default, all bound to 127.0.0.1:
# Prefect server on :4200 (SQLite under runs/prefect), a process worker on pool
# `ssr-process`, the MLflow UI on :5000 over runs/mlflow.db, and register the deployments.
# Existing servers: export PREFECT_API_URL / MLFLOW_TRACKING_URI first and only the worker
# (and the deployments) are set up against them.
#   deploy/start-services.sh [start|stop]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/ssr services "${1:-start}"
