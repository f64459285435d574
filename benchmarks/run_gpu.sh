#!/usr/bin/env bash
# Everything that needs a GPU (run it from anywhere on a machine with CUDA, after
# `pip install -e ".[test,bench]"`):
#
#     bash benchmarks/run_gpu.sh [OUT_DIR]                      # every step; OUT_DIR default benchmarks/out/gpu
#     STEPS="tests tune probe multi" bash benchmarks/run_gpu.sh OUT   # some steps (a 10-minute command limit:
#     STEPS="ratios train train4bit paper micro memory" bash ...       #   run these two halves as two calls)
#
# tests   the GPU tests (tests/test_gpu.py: compiled kernels vs float64 and PEFT; CUDA-graph capture), with a
#         line per test in OUT_DIR/gpu_tests_live.txt as it ends (a run cut off by its limit still tells),
# tune    python -m fastlora.tune: every shipped tile config of the Triton kernels timed at the benchmarks' shapes,
#         winners written to OUT_DIR/tune.json, which every later step reads (FASTLORA_TUNE_CACHE),
# probe   python -m benchmarks.gpu_probe: kernel-only times, per-kernel profile, chosen configs, model checks,
# ratios  paired ratios vs the base layer and PEFT (python -m benchmarks.bench_linear),
# train   one AdamW step of a Llama-3.2-1B-sized LoRA model, PEFT vs PEFT + fastlora.patch (benchmarks.train_step),
# train4bit  the same over a 4-bit NF4 base (QLoRA: benchmarks.train_step --qlora),
# multi   bench_multi (pytest-benchmark, CSV + PNG): one layer eager and as CUDA-graph replays, the batch plan,
#         a whole Llama decode-shaped step vs PEFT,
# paper   the paper's Table 1 (python -m benchmarks.paper_table, all columns, 100 trials),
# micro   bench_linear and bench_merge (pytest-benchmark, CSV + PNG),
# memory  saved-for-backward memory (python -m benchmarks.memory).
# The first GPU run (H200, benchmarks/results/h200_2026-11-26/) needed about: tests 170 s (-n 12, compiles
# dominate), probe 75 s, ratios > 50 s, multi 40 s, paper > 70 s. Each step has its own time limit
# (seconds, overridable: T_TESTS=… etc.), so one slow step cannot starve the others; a failing step is
# reported and the next one runs. The exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=$(realpath -m "${1:-benchmarks/out/gpu}")
STEPS=" ${STEPS:-tests tune probe multi ratios train train4bit paper micro memory} "
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 FASTLORA_BENCH_OUT="$OUT_DIR" FASTLORA_TUNE_CACHE="$OUT_DIR/tune.json"
failed=0
step() {     # step NAME LIMIT CMD...: runs CMD when NAME is in STEPS
    local name=$1 limit=$2; shift 2
    [[ "$STEPS" == *" $name "* ]] || return 0
    echo "=== $(date -u +%T) $name [limit ${limit}s] $*"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $(date -u +%T) $name rc=$rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# parallel workers (pytest-xdist) when installed: the GPU tests' time is mostly Triton compiling
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${JOBS:-12}")
export FASTLORA_LIVE_REPORT="$OUT_DIR/gpu_tests_live.txt"
step tests "${T_TESTS:-200}" python3 -m pytest -q $par -p no:cacheprovider -p tests._live_report -rfE --tb=short \
    tests/test_gpu.py tests/test_autocast.py tests/test_multi_kernels.py::test_cuda_graph_capture \
    tests/test_multi_kernels.py::test_cuda_graph_capture_with_a_plan_refilled_in_place \
    tests/test_multi_kernels.py::test_cuda_graph_captures_a_whole_model_decode_shaped_step
step tune "${T_TUNE:-120}" python3 -m fastlora.tune --tokens 128 2048 4096 8192 --dims 1024 4096 5120 8192 --ranks 16
step probe "${T_PROBE:-120}" python3 -m benchmarks.gpu_probe
step multi "${T_MULTI:-100}" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_multi.py --benchmark-only
step ratios "${T_RATIOS:-90}" python3 -m benchmarks.bench_linear --rounds "${ROUNDS:-30}"
step train "${T_TRAIN:-150}" python3 -m benchmarks.train_step
step train4bit "${T_TRAIN:-150}" python3 -m benchmarks.train_step --qlora
step paper "${T_PAPER:-120}" python3 -m benchmarks.paper_table --device cuda --out-dir "$OUT_DIR" --no-progress
step micro "${T_MICRO:-90}" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_linear.py \
    benchmarks/bench_merge.py --benchmark-only
step memory "${T_MEMORY:-40}" python3 -m benchmarks.memory --device cuda --out-dir "$OUT_DIR"
echo "=== $failed step(s) failed; results in $OUT_DIR"
exit "$failed"
