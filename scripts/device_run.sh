#!/usr/bin/env bash
# One device call: build jax_bq for sm_90a, then run the named steps, each logged.
#
#   bash scripts/device_run.sh STEP [STEP ...]
#
# Steps (each bounded by `timeout`; a failing step does not stop the others):
#   tests[=PYTEST ARGS]  pytest (default: -m gpu, every test that needs the GPU)
#   bench=NAME ARGS      jax-bq bench NAME ARGS (any benchmark; `jax-bq bench` lists them)
#   qmm                  bench qmatmul --encoder (GEMM shapes: device time and span)
#   e2e[=ARGS]           bench e2e ARGS (default: e5_large, every variant, all shapes)
#   kernels[=ARGS]       python3 -m scripts.e2e_kernels ARGS (per-kernel device time by kind)
#   sanitize             compute-sanitizer over tests/cuda/sanitize_driver.cu (SANITIZE_TOOLS,
#                        default all four; SANITIZE_LIMIT seconds each, default 150)
#   run=COMMAND          any command (e.g. a benchmark script with its --out; RUN_LIMIT s)
# Everything lands under $OUT: summary.txt, and out.tgz with every log and the
# benchmarks/results files the steps wrote (the device tool returns 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
# Tests start subprocesses: do not let one process take 75% of HBM.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/jax_bq_out}
mkdir -p "$OUT/logs"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
stamp=$(mktemp) && touch "$stamp"

summary "== $(date -u +%H:%M:%S) machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee -a "$OUT/summary.txt"
t0=$(date +%s)
# The build and everything after it count against DEADLINE.
JAX_BQ_CUDA=ON JAX_BQ_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install \
  --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1
rc=$?
summary "== build exit $rc in $(($(date +%s) - t0)) s"
if [ $rc -ne 0 ]; then tail -40 "$OUT/logs/build.log"; exit 1; fi
python3 -m jax_bq info >> "$OUT/summary.txt" 2>&1

# DEADLINE (seconds since the start, default 540): later steps are cut to what
# is left and skipped once it has passed, so the packing below always runs.
t_start=$t0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  local left=$((${DEADLINE:-540} - (t - t_start)))
  if [ "$left" -le 5 ]; then summary "== $name skipped: deadline"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local code=$?
  summary "== $(date -u +%H:%M:%S) $name exit $code in $(($(date +%s) - t)) s"
  tail -${TAIL:-12} "$OUT/logs/$name.log" | tee -a "$OUT/summary.txt"
}

for arg in "$@"; do
  name=${arg%%=*}
  val=""
  [ "$arg" != "$name" ] && val=${arg#*=}
  case $name in
    tests) step tests "${TESTS_LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider --maxfail=${MAXFAIL:-25} \
      ${val:-tests -m gpu} ;;
    bench) TAIL=30 step "bench_${val%% *}" "${BENCH_LIMIT:-400}" python3 -m jax_bq bench ${val} ;;
    qmm) step qmm 300 python3 -m jax_bq bench qmatmul --encoder ;;
    e2e) TAIL=30 step "e2e${E2E_TAG:-}" "${E2E_LIMIT:-400}" python3 -m jax_bq bench e2e \
      ${val:-e5_large} ;;
    kernels) TAIL=60 step kernels 300 python3 -m scripts.e2e_kernels ${val} ;;
    sanitize)
      nvcc -std=c++20 -O2 -lineinfo -gencode arch=compute_90a,code=sm_90a -Iffi/include \
        -Iffi/cuda tests/cuda/sanitize_driver.cu -o /tmp/sanitize_driver \
        > "$OUT/logs/sanitize_build.log" 2>&1 || summary "sanitize driver build failed"
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
        TAIL=4 step "sanitize_$tool" "${SANITIZE_LIMIT:-150}" compute-sanitizer --tool $tool \
          --error-exitcode 99 /tmp/sanitize_driver
      done ;;
    run) step "run_$(echo "$val" | tr -c 'A-Za-z0-9' '_' | cut -c1-40)" "${RUN_LIMIT:-400}" bash -c "$val" ;;
    *) summary "unknown step $name" ;;
  esac
done

mkdir -p "$OUT/results"
find benchmarks/results -newer "$stamp" -type f -exec cp {} "$OUT/results/" \;
tar -C "$OUT" -czf /tmp/jax_bq_out.tgz logs results && rm -rf "$OUT/logs" "$OUT/results" \
  && mv /tmp/jax_bq_out.tgz "$OUT/out.tgz"
summary "== done $(date -u +%H:%M:%S)"
