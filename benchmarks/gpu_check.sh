#!/usr/bin/env bash
# One prepared command for a machine with a GPU: install, GPU test tier, every benchmark at paper shapes,
# JSON records + one summary table into OUTDIR. Designed for < 8 minutes on an H100/H200 (stage budgets in
# benchmarks/README.md), from a copied tree with torch preinstalled and no internet.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # GPU machine
#   bash benchmarks/gpu_check.sh --cpu OUTDIR    # the same stages on CPU at small shapes (CI runs this)
#
# Stages run in order, each under its own time limit; a failing stage is recorded and the next one still
# runs (one GPU window should yield every measurement it can). OUTDIR gets: records/*.json (one per
# benchmark run, see benchmarks/_record.py), <stage>.log per stage, stages.json (status and seconds per
# stage) and summary.md (the stage table and the benchmark table). Exit status: 0 if every stage passed.
# Environment: PYTHON (default: python), MAX_JOBS (parallel compile jobs of the extension build, default 8),
# GPU_CHECK_BUDGET (seconds for the whole run, default 780 (1500 with --cpu): a stage gets at most what is left, so a hung
# stage cannot eat a 15-minute GPU window; stages with nothing left are recorded as skipped, rc 124).
set -u

CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu] OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
cd "$ROOT" || exit 2
mkdir -p "$OUT/records"
: > "$OUT/stages.tsv"
export LWAM_BENCH_RECORD=1 LWAM_BENCH_RESULTS="$OUT/records" MUJOCO_GL=${MUJOCO_GL:-egl}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ "$CPU" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  unset TRITON_INTERPRET
fi
export MAX_JOBS=${MAX_JOBS:-8}
if [ "$CPU" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-1500}; else BUDGET=${GPU_CHECK_BUDGET:-780}; fi
START=$(date +%s)
FAILED=0

# stage NAME LIMIT_SECONDS EXPECTED_GPU_SECONDS COMMAND...
stage() {
  local name=$1 limit=$2 expected=$3
  shift 3
  local t0 rc left
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START) ))
  [ "$name" = summary ] && left=$(( left > 60 ? left : 60 ))   # the summary always runs
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo "[gpu_check] stage $name: skipped, the ${BUDGET}s budget is spent"
    FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" 124 0 0 "$expected" >> "$OUT/stages.tsv"
    return
  fi
  echo "[gpu_check] $(date +%H:%M:%S) stage $name (limit ${limit}s, expected on H100/H200 ~${expected}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 3 "$OUT/$name.log" | sed "s/^/[gpu_check]   $name | /"
  [ "$rc" = 0 ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" "$expected" >> "$OUT/stages.tsv"
  echo "[gpu_check] stage $name: rc=$rc in ${dt}s (total $(( $(date +%s) - START ))s)"
}

BENCH=("$PY" -m pytest -q -p no:cacheprovider --benchmark-only -s)
if [ "$CPU" = 1 ]; then
  # Same commands, small shapes; the install is only checked (CI's environment is already installed) and
  # the slow interpreter/compile cases are filtered to one representative each.
  stage environment 120 15 "$PY" -m lwam.cli info --build
  stage install 120 100 "$PY" -m pip install --no-build-isolation --no-deps -e . --dry-run
  stage gpu_tests 300 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  stage bench_query_pool 300 60 "${BENCH[@]}" benchmarks/test_bench_query_pool.py \
      -k "infer-float32-fwd-fused or infer-float32-fwd-reference]"
  stage bench_latent_downsample 300 20 "${BENCH[@]}" benchmarks/test_bench_latent_downsample.py -k "paper-float32"
  stage bench_policy 600 80 "${BENCH[@]}" benchmarks/test_bench_policy.py
  stage bench_train_step 600 80 "${BENCH[@]}" benchmarks/test_bench_train_step.py -k "reference"
else
  stage environment 60 10 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
  stage install 240 100 "$PY" -m pip install --no-build-isolation --no-deps -e .
  stage build_info 60 5 "$PY" -m lwam.cli info --build
  stage gpu_tests 240 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  # fused pooling: fwd+bwd at the training shape, fwd at inference, bf16 (fp32 is a test-tier matter)
  stage bench_query_pool 150 60 "${BENCH[@]}" benchmarks/test_bench_query_pool.py \
      -k "train-bfloat16-fwd_bwd or infer-bfloat16-fwd-"
  stage bench_latent_downsample 90 20 "${BENCH[@]}" benchmarks/test_bench_latent_downsample.py
  stage bench_policy 180 80 "${BENCH[@]}" benchmarks/test_bench_policy.py
  # training step at batch 16: the fast step vs the reference (fast_eager is a CPU-tier matter)
  stage bench_train_step 180 80 "${BENCH[@]}" benchmarks/test_bench_train_step.py -k "reference or fast]"
fi

stage summary 120 5 "$PY" benchmarks/gpu_check_summary.py "$OUT"
echo "[gpu_check] done in $(( $(date +%s) - START ))s; summary: $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null
exit $FAILED
