#!/usr/bin/env bash
# One prepared command for a lent GPU machine (one command of at most 600 s, at most 8 files back, no
# package index): install, the headline benchmarks at paper shapes, then the GPU test tier with what time
# is left. Everything it writes is packed into OUTDIR/gpu_check.tar.gz, beside OUTDIR/summary.json (the
# headline numbers, every stage's status, what was built): two files, both rewritten after every stage.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # GPU machine (e.g. OUTDIR=$OUT)
#   bash benchmarks/gpu_check.sh --cpu OUTDIR    # the same stages on CPU at small shapes (CI runs this)
#   bash benchmarks/gpu_check.sh [--cpu] --plan  # print the plan (stages, shares, python, nvcc) as JSON
#
# Stages, in order: environment, install, bench_latent_downsample (vs copy bandwidth), bench_query_pool
# (fused vs reference, fwd+bwd), bench_policy (Policy vs the eager reference path, peak memory),
# bench_train_step (fast vs reference, one trainer at a time), gpu_tests (pytest -m "gpu or install_check"),
# each under its share of the budget: a stage past its share is cut (rc 124) and the next one starts; the
# last one gets whatever is left. Benchmarks write their records as each measurement finishes, so a cut
# stage keeps what it measured. A failing stage does not stop the next. Exit status 0 if every stage passed.
#
# Environment: PYTHON (default: the first of python3, python that imports torch), GPU_CHECK_BUDGET
# (seconds for all stages, default 480; 900 with --cpu), GPU_CHECK_SHARE_<stage> (one stage's share),
# GPU_CHECK_ONLY (comma-separated stages to run; the others are recorded as not selected), MAX_JOBS
# (parallel compile jobs, default the core count), TORCH_CUDA_ARCH_LIST (default: the GPU's own
# architecture, one build instead of two), GPU_CHECK_WORK (work directory, default a temporary one,
# removed at the end), GPU_CHECK_NVCC_DIRS (where to look for nvcc after CUDA_HOME and PATH).
# nvcc: CUDA_HOME/bin/nvcc when CUDA_HOME is set and holds one (a CUDA_HOME without one is ignored and
# said so), else nvcc on PATH, else the newest of /usr/local/cuda/bin, /usr/local/cuda-*/bin. None found on
# a GPU machine: lwam._C is built without CUDA kernels (LWAM_ALLOW_FALLBACK=1), the run is Triton-only,
# and summary.json says so.
set -u

CPU=0
PLAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1; shift ;;
    --plan) PLAN=1; shift ;;
    *) break ;;
  esac
done
if { [ "$PLAN" = 0 ] && [ $# -ne 1 ]; } || { [ "$PLAN" = 1 ] && [ $# -gt 1 ]; }; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu] OUTDIR   |   bash benchmarks/gpu_check.sh [--cpu] --plan" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

say() { echo "[gpu_check] $*"; }

# --- the Python that has torch --------------------------------------------------------------------------
pick_python() {
  local c
  if [ -n "${PYTHON:-}" ]; then  # asked for: that one or nothing
    "$PYTHON" -c "import torch" >/dev/null 2>&1 && command -v "$PYTHON" && return 0
    return 1
  fi
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}
if ! PY=$(pick_python); then
  echo "[gpu_check] ERROR: no Python that imports torch (tried ${PYTHON:-python3, python}); set PYTHON" >&2
  exit 2
fi

# --- nvcc, and with it what lwam._C can be -----------------------------------------------------------
NOTE=""
for var in CUDA_HOME CUDA_PATH; do
  # A machine's stale CUDA_HOME would stop setup.py; here the run looks for a toolkit itself instead.
  if [ -n "${!var:-}" ] && [ ! -x "${!var}/bin/nvcc" ]; then
    NOTE="$NOTE$var=${!var} holds no bin/nvcc (ignored); "
    unset "$var"
  fi
done
find_nvcc() {
  local d
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME/bin/nvcc"; return 0; fi
  if [ -n "${CUDA_PATH:-}" ]; then echo "$CUDA_PATH/bin/nvcc"; return 0; fi
  command -v nvcc 2>/dev/null && return 0
  # shellcheck disable=SC2086  # the globs are meant to expand
  for d in $(ls -d ${GPU_CHECK_NVCC_DIRS:-/usr/local/cuda/bin /usr/local/cuda-*/bin} 2>/dev/null | sort -rV); do
    [ -x "$d/nvcc" ] && { echo "$d/nvcc"; return 0; }
  done
  return 0
}
NVCC=$(find_nvcc)
if [ "$CPU" = 1 ]; then
  EXT_MODE=cpu
  EXT_REASON="CPU mode: the installed build is checked, not rebuilt"
elif [ -n "$NVCC" ]; then
  EXT_MODE=cuda
  EXT_REASON="${NOTE}lwam._C to be built as a CUDAExtension with $NVCC"
  export PATH="$(dirname "$NVCC"):$PATH"
else
  EXT_MODE=triton-only
  EXT_REASON="${NOTE}no nvcc found (CUDA_HOME, PATH, ${GPU_CHECK_NVCC_DIRS:-/usr/local/cuda/bin /usr/local/cuda-*/bin}): lwam._C built without CUDA kernels (LWAM_ALLOW_FALLBACK=1); CUDA latents use the reference, the Triton kernels run compiled"
  export LWAM_ALLOW_FALLBACK=1
fi

# --- stages ---------------------------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-900}; else BUDGET=${GPU_CHECK_BUDGET:-480}; fi
NAMES=()
SHARES=()
CMDS=()
add_stage() {  # add_stage NAME SHARE COMMAND (a bash command line); SHARE "rest" = what is left
  local var="GPU_CHECK_SHARE_$1"
  NAMES+=("$1")
  SHARES+=("${!var:-$2}")
  CMDS+=("$3")
}
P=$(printf '%q' "$PY")
BENCH="$P -m pytest -q -p no:cacheprovider --benchmark-only -s"
# No package index on the device: never ask one (the install needs none: torch is there, no dependencies).
PIP_INSTALL="$P -m pip install --no-index --no-build-isolation --no-deps -e ."
GPU_TESTS="$P -m pytest -q -p no:cacheprovider -m 'gpu or install_check' tests --junitxml=\"\$GPU_CHECK_DIR/gpu_tests.xml\""
CHECK_INSTALL="$P -m lwam.info --json > \"\$GPU_CHECK_DIR/build_info.json\" && $P -m lwam.info && $P benchmarks/gpu_check_summary.py --check-install \"\$GPU_CHECK_DIR/build_info.json\""
if [ "$CPU" = 1 ]; then
  # Same stages at small shapes; the install is only checked (CI's environment is already installed) and
  # the slow interpreter/compile cases are filtered to the headline ones.
  add_stage environment 60 "$P -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, triton.__version__)'"
  add_stage install 120 "$PIP_INSTALL --dry-run && $CHECK_INSTALL"
  add_stage bench_latent_downsample 120 "$BENCH benchmarks/test_bench_latent_downsample.py -k paper-float32"
  add_stage bench_query_pool 150 "$BENCH benchmarks/test_bench_query_pool.py -k 'train-float32-fwd_bwd-fused or train-float32-fwd_bwd-reference]'"
  add_stage bench_policy 300 "$BENCH benchmarks/test_bench_policy.py"
  add_stage bench_train_step 300 "$BENCH benchmarks/test_bench_train_step.py -k 'reference or fast_eager'"
  add_stage gpu_tests rest "$GPU_TESTS"
else
  add_stage environment 20 "nvidia-smi; $P -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
  add_stage install 120 "$PIP_INSTALL && $CHECK_INSTALL"
  add_stage bench_latent_downsample 25 "$BENCH benchmarks/test_bench_latent_downsample.py -k 'not avg_pool3d_compiled or paper-bfloat16'"
  add_stage bench_query_pool 60 "$BENCH benchmarks/test_bench_query_pool.py -k 'train-bfloat16-fwd_bwd or infer-bfloat16-fwd-'"
  add_stage bench_policy 120 "$BENCH benchmarks/test_bench_policy.py"
  add_stage bench_train_step 120 "$BENCH benchmarks/test_bench_train_step.py -k 'reference or fast]'"
  add_stage gpu_tests rest "$GPU_TESTS"
fi

if [ "$PLAN" = 1 ]; then
  {
    printf 'mode\t%s\nbudget_s\t%s\npython\t%s\nnvcc\t%s\nextension_mode\t%s\nextension_reason\t%s\n' \
      "$([ "$CPU" = 1 ] && echo cpu || echo gpu)" "$BUDGET" "$PY" "$NVCC" "$EXT_MODE" "$EXT_REASON"
    for i in "${!NAMES[@]}"; do printf 'stage\t%s\t%s\t%s\n' "${NAMES[$i]}" "${SHARES[$i]}" "${CMDS[$i]}"; done
  } | "$PY" benchmarks/gpu_check_summary.py --plan
  exit $?
fi

OUT=$(mkdir -p "$1" && cd "$1" && pwd)
if [ -n "${GPU_CHECK_WORK:-}" ]; then WORK=$(mkdir -p "$GPU_CHECK_WORK" && cd "$GPU_CHECK_WORK" && pwd); KEEP=1
else WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); KEEP=0; fi
mkdir -p "$WORK/gpu_check/records" "$WORK/gpu_check/logs"
export GPU_CHECK_DIR="$WORK/gpu_check"
export LWAM_BENCH_RECORD=1 LWAM_BENCH_RESULTS="$GPU_CHECK_DIR/records" MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ "$CPU" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  unset TRITON_INTERPRET  # the GPU run measures and tests compiled kernels
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ "$CPU" = 0 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null) \
    && export TORCH_CUDA_ARCH_LIST="$ARCH"
fi
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$("$PY" -c "
import importlib.metadata as m, platform, torch
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return ''
print(platform.python_version(), torch.__version__, torch.version.cuda or '', v('triton') or '', sep='|')" 2>/dev/null)
IFS='|' read -r PY_V TORCH_V TORCH_CUDA_V TRITON_V <<< "$VERSIONS"
printf '%s\t%s\n' mode "$([ "$CPU" = 1 ] && echo cpu || echo gpu)" budget_s "$BUDGET" python "$PY" \
  python_version "${PY_V:-}" torch "${TORCH_V:-}" torch_cuda "${TORCH_CUDA_V:-}" triton "${TRITON_V:-}" \
  nvcc "$NVCC" extension_mode "$EXT_MODE" extension_reason "$EXT_REASON" gpu "$GPU_NAME" \
  torch_cuda_arch_list "${TORCH_CUDA_ARCH_LIST:-}" max_jobs "$MAX_JOBS" host "$(hostname 2>/dev/null)" \
  started "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$GPU_CHECK_DIR/facts.tsv"
: > "$GPU_CHECK_DIR/stages.tsv"

pack() {  # summary.json + summary.md from what is there now, then the tarball; both replaced atomically
  "$PY" benchmarks/gpu_check_summary.py "$GPU_CHECK_DIR" > "$GPU_CHECK_DIR/logs/summary.log" 2>&1 \
    || say "summary failed: $(tail -n 1 "$GPU_CHECK_DIR/logs/summary.log")"
  [ -f "$GPU_CHECK_DIR/summary.json" ] && cp "$GPU_CHECK_DIR/summary.json" "$OUT/.summary.json.tmp" \
    && mv -f "$OUT/.summary.json.tmp" "$OUT/summary.json"
  tar -czf "$OUT/.gpu_check.tar.gz.tmp" -C "$WORK" gpu_check && mv -f "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}
trap 'say "interrupted"; pack; exit 130' INT TERM

selected() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *",$1,"* ]]; }

START=$(date +%s)
FAILED=0
say "python $PY; lwam._C: $EXT_MODE ($EXT_REASON); budget ${BUDGET}s; work $GPU_CHECK_DIR"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  share=${SHARES[$i]}
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START) ))
  if [ "$share" = rest ]; then share=$left; fi
  limit=$(( share < left ? share : left ))
  if ! selected "$name"; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "" 0 0 "$share" "not selected" >> "$GPU_CHECK_DIR/stages.tsv"
    continue
  fi
  if [ "$limit" -le 0 ]; then
    say "stage $name: skipped, the ${BUDGET}s budget is spent"
    FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "" 0 0 "$share" "skipped: budget spent" >> "$GPU_CHECK_DIR/stages.tsv"
    pack
    continue
  fi
  say "$(date +%H:%M:%S) stage $name (limit ${limit}s): ${CMDS[$i]}"
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "${CMDS[$i]}" > "$GPU_CHECK_DIR/logs/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status="cut at its ${limit}s share" ;;
    *) status="failed (rc $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAILED=1
  tail -n 3 "$GPU_CHECK_DIR/logs/$name.log" | sed "s/^/[gpu_check]   $name | /"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" "$share" "$status" >> "$GPU_CHECK_DIR/stages.tsv"
  say "stage $name: $status in ${dt}s (total $(( $(date +%s) - START ))s)"
  pack
done
trap - INT TERM
pack
say "done in $(( $(date +%s) - START ))s: $OUT/summary.json, $OUT/gpu_check.tar.gz"
cat "$GPU_CHECK_DIR/summary.md" 2>/dev/null
[ "$KEEP" = 1 ] || rm -rf "$WORK"
exit $FAILED
