#!/usr/bin/env bash
# The test command: sets everything up on a fresh clone, checks the layering, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONHASHSEED=0
echo "== import-linter (package layering) =="
lint-imports --no-cache
echo "== pytest =="
exec python -m pytest -q "$@"
