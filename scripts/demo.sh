#!/usr/bin/env bash
# The main job on the built-in dataset, from a fresh clone:
#   installs, starts a local Prefect server + process worker + MLflow UI (127.0.0.1),
#   registers the deployments, runs `prefect deployment run ssr/reproduce-fewshot` and follows it
#   with `ssr watch` (step, progress, latest log line every 5 s),
#   then prints the results table, the UI addresses and the registered model.
# DEPLOYMENT=reproduce-retrieval (or reproduce-fewshot-tiny) picks another deployment.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/bootstrap.sh
. .venv/bin/activate
export SSR_HOME="${SSR_HOME:-$PWD/runs}"
mkdir -p "$SSR_HOME"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
DEPLOYMENT="${DEPLOYMENT:-reproduce-fewshot}"
echo "== starting local services =="
ssr services start | tee "$SSR_HOME/services.txt"
export PREFECT_API_URL="$(awk '/^prefect_api:/{print $2}' "$SSR_HOME/services.txt")"
echo "== running ssr/$DEPLOYMENT (the running step, its progress and the latest log line every 5 s) =="
run_id=$(prefect deployment run "ssr/$DEPLOYMENT" | awk '/UUID:/{print $NF}')
ssr watch "$run_id" --interval 5 --timeout 5400
echo
echo "== results =="
case "$DEPLOYMENT" in *retrieval*) kind=retrieval ;; *) kind=fewshot ;; esac
latest=$(ls -t "$SSR_HOME"/$kind/*/results/*/results.md | head -n 1)
cat "$latest"
echo
ssr models
model=ssr-fewshot; [ "$kind" = retrieval ] && model=ssr-retrieval
echo "registered model URI: models:/$model@champion  (mlflow.pytorch.load_model; see README)"
echo
grep -E "prefect_ui|mlflow_ui" "$SSR_HOME/services.txt"
echo "results: $latest"
echo "wall time: $(( $(date +%s) - start )) s  (services keep running; stop them with: .venv/bin/ssr services stop)"
