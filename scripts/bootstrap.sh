#!/usr/bin/env bash
# Creates .venv and installs the project (CPU torch first, from the local wheel cache), every
# other dependency at the version pinned in constraints.txt (scripts/refresh-constraints.sh
# regenerates it). Idempotent: skips the install when neither pyproject.toml nor
# constraints.txt has changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ssr-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and without the constraints: 2.13.0 is the CPU build on this machine's disk;
  # any other spec pulls CUDA. On a GPU machine, a CUDA torch installed beforehand is kept.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
