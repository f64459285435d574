#!/usr/bin/env bash
# Everything that needs a GPU, in one go (run it from anywhere on a machine with CUDA, after
# `pip install -e ".[test,bench]"`):
#
#     bash benchmarks/run_gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results
#
# 1. the GPU tests (tests/test_gpu.py: the compiled kernels vs float64 and PEFT; CUDA-graph capture),
# 2. the probe (python -m benchmarks.gpu_probe: kernel-only times, per-kernel profile, tuned configs),
# 3. issue 2's paired ratios (python -m benchmarks.bench_linear),
# 4. the microbenchmarks (bench_multi, bench_linear, bench_merge: pytest-benchmark, CSV + PNG),
# 5. the paper's Table 1 (python -m benchmarks.paper_table, all columns, 100 trials),
# 6. saved-for-backward memory (python -m benchmarks.memory).
# The first GPU run (15 minutes of device time, benchmarks/results/h200_2026-11-26/) needed about: tests
# 170 s (-n 12, compiles dominate), probe 75 s, ratios > 50 s, bench_multi 40 s, paper table > 70 s.
# Each step has its own time limit (seconds, overridable: T_TESTS=… bash benchmarks/run_gpu.sh), so one
# slow step cannot starve the others; a failing step is reported and the next one runs. The exit
# status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=$(realpath -m "${1:-benchmarks/results}")
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 FASTLORA_BENCH_OUT="$OUT_DIR"
failed=0
step() {
    local limit=$1; shift
    echo "=== $(date -u +%T) [limit ${limit}s] $*"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $(date -u +%T) rc=$rc: $*"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step 30 python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# parallel workers (pytest-xdist) when installed: the GPU tests' time is mostly Triton compiling
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${JOBS:-12}")
export FASTLORA_LIVE_REPORT="$OUT_DIR/gpu_tests_live.txt"      # a line per test as it ends (cut-off safe)
step "${T_TESTS:-200}" python3 -m pytest -q $par -p no:cacheprovider -p tests._live_report -rfE --tb=short \
    tests/test_gpu.py tests/test_multi_kernels.py::test_cuda_graph_capture
step "${T_PROBE:-100}" python3 -m benchmarks.gpu_probe
step "${T_RATIOS:-90}" python3 -m benchmarks.bench_linear --rounds "${ROUNDS:-30}"
step "${T_MULTI:-70}" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_multi.py --benchmark-only
step "${T_PAPER:-90}" python3 -m benchmarks.paper_table --device cuda --out-dir "$OUT_DIR" --no-progress
step "${T_MICRO:-90}" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_linear.py benchmarks/bench_merge.py \
    --benchmark-only
step "${T_MEMORY:-40}" python3 -m benchmarks.memory --device cuda --out-dir "$OUT_DIR"
echo "=== $failed step(s) failed; results in $OUT_DIR"
exit "$failed"
