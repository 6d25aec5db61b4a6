#!/usr/bin/env bash
# Every GPU measurement of thawed in one command, sized to finish in under 8 minutes on an H200
# (GPU time is scarce): correctness of every Triton kernel against its PyTorch reference first, then
# decode GB/s per codec next to the copy bandwidth, fused GEMV against bf16 F.linear, and ms/token
# at batch 1 and 8 (dense bf16 eager and compiled, warm, compressed-resident, streaming at 25 %).
# Writes $OUT/gpu_check.json (and gpu_check.log); prints a table last.
#
#   benchmarks/gpu_check.sh             # on a GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run   # here, without a GPU: same code paths, tiny shapes,
#                                       # Triton's CPU interpreter (checks the script, not speed)
# Extra arguments go to benchmarks/gpu_bench.py (e.g. --sections copy,correct --deadline 200).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
  export TRITON_INTERPRET=1
  [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
# The GPU machine brings its own torch, Triton and transformers; thawed is imported from this tree
# (no install: nothing can be downloaded there), through a folder that maps thawed.* onto it.
PKG=$(mktemp -d)
mkdir -p "$PKG/thawed"
for sub in codecs runtime server; do ln -s "$PWD/$sub" "$PKG/thawed/$sub"; done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
# 1. the kernel and GPU tests, natively (each kernel against its PyTorch reference on odd shapes;
#    CUDA graphs and the ring against eager); skipped with GPU_CHECK_TESTS=0
if [ "${GPU_CHECK_TESTS:-1}" = "1" ] && [ "${1:-}" != "--dry-run" ]; then
  timeout 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_*.py tests/test_ring.py \
      tests/test_stepper.py -k cuda \
      2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
# 2. the measurements. 380 s: the script's own deadline (--deadline, default 320 s) skips sections and
#    configurations that would start later; results are saved after each one
timeout 380 "$PY" benchmarks/gpu_bench.py --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
exit "$rc"
