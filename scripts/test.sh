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
echo "== ruff =="
ruff check flows ssr_tasks ssr_model storage tests benchmarks
ruff format --check flows ssr_tasks ssr_model storage tests benchmarks
echo "== mypy =="
mypy flows ssr_tasks ssr_model storage
# The browser tests drive Debian's Chromium (never a Playwright browser download). Without
# it they skip, saying so; install it here when we are root and apt works.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing chromium for the browser tests (apt-get) =="
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/tmp/ssr-apt-chromium.log 2>&1 || echo "chromium not installed (see /tmp/ssr-apt-chromium.log); browser tests will skip"
fi
echo "== pytest =="
exec python -m pytest -q --durations=30 "$@"
