#!/usr/bin/env bash
# Detailed ncu report of the main quantize/dequantize kernels (device machine).
set -uo pipefail
OUT=${OUT:-/tmp/jax_bq_out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
JAX_BQ_CUDA=ON JAX_BQ_CUDA_ARCHS=90a python3 -m pip install --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
timeout 300 ncu --clock-control none --kernel-name regex:"FusedQuantizeKernel|DequantizeKernel" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
  --section WarpStateStats --section LaunchStats --section SchedulerStats \
  python3 docs/experiments/scripts/gpu_profile.py one > "$OUT/ncu_detail.txt" 2>&1
echo "ncu exit $?"
grep -E "FusedQuantizeKernel|DequantizeKernel|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Issued Warp|No Eligible|Warp Cycles Per Issued|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Block Limit" "$OUT/ncu_detail.txt" | cut -c1-150
