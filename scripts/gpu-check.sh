#!/usr/bin/env bash
# The prepared GPU check (README "GPU check"). On one CUDA GPU, within 8 minutes, it runs:
#   1. gpu-tests       pytest -m gpu (CPU and CUDA compute the same SSR)
#   2. bench-ssr-model benchmarks/bench_ssr_model.py --device cuda (ours against the authors'
#                      code when SSR_AUTHORS_SRC names a checkout of github.com/XiSHEN0220/SSR)
#   3. paper-iteration training iterations at the paper's sizes and the hours they imply for
#                      paper-fewshot (30,000 + 3 x 10,000 iterations, steps 1..4, x 3 lr_dni)
#                      and paper-retrieval (60,000 iterations x 3 lr_dni), trials one after
#                      another on this one GPU, validation not counted
#   4. fewshot-tiny    ssr run fewshot --preset reproduce-fewshot-tiny --set device=cuda
#   5. retrieval-tiny  ssr run retrieval --preset reproduce-retrieval, tiny settings, device=cuda
#                      (Ray Tune trials and re-ranking actors then each ask for one GPU)
# and prints one table: step | result | seconds | figure. Each step has its own timeout and
# the whole stays under GPU_CHECK_BUDGET seconds (default 470); a failed or timed-out step
# is reported and the next one runs; the exit code is 1 if any step failed.
# Without CUDA it prints one line and exits 0 at once.
#
# Logs and run folders stay in a temporary folder, printed at the end. The pipelines run on
# local throw-away services: PREFECT_API_URL, RAY_ADDRESS and MLFLOW_TRACKING_URI are unset
# for them. PYTHON picks the interpreter (default .venv/bin/python, made by
# scripts/bootstrap.sh after a CUDA torch build was installed).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU, with smaller benchmark sizes: a dry
# run of this script on a machine without a GPU (slow, and not a GPU check).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-470}
GRACE=10 # seconds between TERM and KILL when a step times out

if [ "$DEVICE" = cuda ] && ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && [ ! -e /dev/dxg ]; then
  echo "gpu-check: no CUDA device (no /dev/nvidia* device files); nothing to check, exiting."
  exit 0
fi
if [ "$DEVICE" = cuda ]; then
  cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)
  if [ "$cuda" != True ]; then
    if [ -z "$cuda" ]; then
      echo "gpu-check: torch cannot be imported with $PY; run scripts/bootstrap.sh first. Nothing checked."
      exit 2
    fi
    echo "gpu-check: no CUDA device (torch.cuda.is_available() is False with $PY); nothing to check, exiting."
    exit 0
  fi
fi

work=$(mktemp -d -t ssr-gpu-check.XXXXXX)
SSR=$(dirname "$PY")/ssr
[ -x "$SSR" ] || SSR=ssr
failed=0
rows=()

# run_step NAME LIMIT FIGURE_FUNCTION COMMAND...: runs COMMAND with its output in
# $work/NAME.log, under min(LIMIT, what is left of the budget) seconds.
run_step() {
  local name=$1 limit=$2 figure_fn=$3
  shift 3
  local left=$((BUDGET - SECONDS - GRACE))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    rows+=("| $name | FAIL (no time left in the ${BUDGET} s budget) | 0 | |")
    failed=1
    return
  fi
  echo "gpu-check: $name (at most $limit s; log $work/$name.log)" >&2
  local start rc took result figure
  start=$(date +%s.%N)
  timeout -k "$GRACE" "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) result=ok ;;
    124 | 137) result="FAIL (timed out after $limit s)" ;;
    *) result="FAIL (exit $rc)" ;;
  esac
  figure=$("$figure_fn" "$work/$name.log" 2>/dev/null | head -n 1 | tr '|' '/')
  if [ "$rc" = 0 ] && [ -z "$figure" ]; then
    result="FAIL (no result in the log)"
  fi
  [ "$result" = ok ] || failed=1
  [ "$rc" = 0 ] || figure="${figure:-$(grep -v '^\s*$' "$work/$name.log" | tail -n 1 | cut -c1-100 | tr '|' '/')}"
  rows+=("| $name | $result | $took | $figure |")
}

# --------------------------------------------------------------------------- figures

fig_pytest() { # "2 passed in 3.10s"
  grep -E '^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|error)' "$1" | tail -n 1 | tr -d '='
}

fig_bench() { # ours (and the authors' speed-up) per case from the Markdown table
  awk -F'|' '
    /^\| few-shot inference/ && /steps=3/ { s = s sprintf("few-shot s=3 %s%s; ", trim($3), up($5)) }
    /^\| retrieval inference/ { s = s sprintf("retrieval %s%s; ", trim($3), up($5)) }
    /^\| few-shot training step/ { s = s sprintf("train step %s%s", trim($3), up($5)) }
    function trim(x) { gsub(/^ +| +$/, "", x); return x }
    function up(x) { x = trim(x); return x == "" ? "" : " (" x " vs authors)" }
    END { if (s != "") print s (ENVIRON["AUTHORS_NOTE"]) }' "$1"
}

fig_paper() { grep '^FIGURE: ' "$1" | tail -n 1 | cut -c9-; }

fig_fewshot() { # the SSR row of the results table: "SSR (steps=2) 1-shot 41.20 ± 3.1 %"
  awk -F'|' '/^\| SSR / { gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $4); print $2 " 1-shot " $4 " %, device " ENVIRON["DEVICE"]; exit }' "$1"
}

fig_retrieval() { # "features + SSR" row: mAP easy / medium / hard
  awk -F'|' '/^\| features \+ SSR / { for (i = 2; i <= 5; i++) gsub(/^ +| +$/, "", $i);
    print $2 " mAP E/M/H " $3 "/" $4 "/" $5 ", device " ENVIRON["DEVICE"]; exit }' "$1"
}

# --------------------------------------------------------------------------- steps

export DEVICE
export PYTHONHASHSEED=0

run_step gpu-tests 60 fig_pytest "$PY" -m pytest -q -m gpu -p no:cacheprovider tests

bench_args=(--device "$DEVICE")
[ "$DEVICE" = cpu ] && bench_args+=(--episodes 1 --queries 2 --repeats 1 --skip-memory)
AUTHORS_NOTE="; authors' code not given (SSR_AUTHORS_SRC)"
if [ -n "${SSR_AUTHORS_SRC:-}" ] && [ -d "${SSR_AUTHORS_SRC}" ]; then
  bench_args+=(--authors-src "$SSR_AUTHORS_SRC")
  AUTHORS_NOTE=""
fi
export AUTHORS_NOTE
run_step bench-ssr-model 90 fig_bench "$PY" benchmarks/bench_ssr_model.py "${bench_args[@]}"

# Training iterations as the trials run them (ssr_tasks/{fewshot,retrieval}/train.py): one
# episode or one query per iteration, forward + loss + backward + SGD step, float32.
read -r -d '' PAPER_TIMING <<'EOF'
import sys, time
import torch
from ssr_model.fewshot import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy, info_bce
from ssr_model.retrieval import RetrievalSSR

device = torch.device(sys.argv[1])
warmup, timed = (2, 10) if device.type == "cuda" else (1, 1)
torch.manual_seed(0)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iteration(model, loss_fn, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    sync()
    return (time.perf_counter() - start) / timed


# paper-fewshot: 5-way 1-shot, 15 queries per class, D=640 (WRN-28-10), hidden 4096
n_way, n_query, D = 5, 75, 640
support = torch.randn(1, n_way, 1, D, device=device)
query = torch.randn(1, n_query, D, device=device)
labels = torch.arange(n_way, device=device).repeat_interleave(n_query // n_way)[None]
fewshot = {}
for steps in (1, 2, 3, 4):
    model = FewShotSSR(D, n_way, n_query, steps, lr_dni=1e-3, hidden=4096, device=device).train()
    fewshot[steps] = seconds_per_iteration(model, lambda: fewshot_cross_entropy(model(support, query), labels), 0.1)
    print(f"few-shot steps={steps}: {fewshot[steps] * 1e3:.1f} ms/iteration", flush=True)
    del model

# paper-retrieval: k=100, D=2048 (R-GeM), hidden 1024, steps 1, one query per iteration
k, D = 100, 2048
q = torch.nn.functional.normalize(torch.randn(1, D, device=device), dim=-1)
nb = torch.nn.functional.normalize(torch.randn(1, k, D, device=device), dim=-1)
positives = torch.zeros(1, k, dtype=torch.bool, device=device)
positives[0, ::7] = True
model = RetrievalSSR(D, k, 1, lr_dni=1e-4, hidden=1024, device=device).train()
retrieval = seconds_per_iteration(model, lambda: info_bce(model(q, nb), positives, model.scale_cls), 1e-3)
print(f"retrieval k=100: {retrieval * 1e3:.1f} ms/iteration", flush=True)

fewshot_h = 3 * (30_000 * fewshot[1] + 10_000 * (fewshot[2] + fewshot[3] + fewshot[4])) / 3600
retrieval_h = 3 * 60_000 * retrieval / 3600
print(f"paper-fewshot: 3 lr_dni x (30,000 x steps 1 + 10,000 x steps 2, 3, 4) = {fewshot_h:.2f} h of training")
print(f"paper-retrieval: 3 lr_dni x 60,000 = {retrieval_h:.2f} h of training")
per_it = "/".join(f"{fewshot[s] * 1e3:.0f}" for s in (1, 2, 3, 4))
print(f"FIGURE: paper-fewshot {fewshot_h:.1f} h (ms/it s1..4 {per_it}); "
      f"paper-retrieval {retrieval_h:.1f} h ({retrieval * 1e3:.1f} ms/it); training only, trials in series")
EOF
run_step paper-iteration 60 fig_paper env PYTHONPATH=. "$PY" -c "$PAPER_TIMING" "$DEVICE"

# The pipelines: in-process flows on a temporary Prefect server, a local Ray instance and
# MLflow on SQLite, all inside $work.
pipeline_env=(env -u PREFECT_API_URL -u RAY_ADDRESS -u MLFLOW_TRACKING_URI PREFECT_HOME="$work/prefect")

run_step fewshot-tiny 130 fig_fewshot "${pipeline_env[@]}" SSR_HOME="$work/fewshot-home" \
  "$SSR" run fewshot --preset reproduce-fewshot-tiny --set device="$DEVICE"

# The tiny retrieval settings of tests/flows/test_flow_pipelines.py (TINY_RETRIEVAL).
run_step retrieval-tiny 130 fig_retrieval "${pipeline_env[@]}" SSR_HOME="$work/retrieval-home" \
  "$SSR" run retrieval --preset reproduce-retrieval --set device="$DEVICE" \
  --set data.glyphs_size=small --set data.holdout_fraction=0.3 --set backbone.pretrain_epochs=1 \
  --set train.k=10 --set train.hidden=32 --set train.sequence_length=100 --set train.iterations=6 \
  --set train.val_every=3 --set train.batch_queries=4 --set train.n_val_queries=10 \
  --set 'sweep={"lr_dni": [0.0001]}' --set evaluation.shard_size=8 \
  --set 'baselines.qe_n_grid=[1, 3]' --set 'baselines.krecip_pairs=[[10, 5]]' \
  --set 'baselines.krecip_lambda=[0.3]' --set model_name=ssr-retrieval-gpu-check

# --------------------------------------------------------------------------- the table

gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>/dev/null)
echo
echo "GPU check on $gpu, device=$DEVICE, torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); $SECONDS s in all (budget $BUDGET s)"
echo
echo "| step | result | seconds | figure |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "logs: $work"
exit "$failed"
