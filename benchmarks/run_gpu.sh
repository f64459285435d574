#!/usr/bin/env bash
# The GPU day in ONE call: everything that needs a GPU, most-needed first, inside one time budget.
#
#     bash benchmarks/run_gpu.sh [--dry-run] [--pack DIR] [OUT_DIR]
#
# OUT_DIR (default benchmarks/out/gpu) receives each step's CSV / log as soon as the step ends, and the whole
# log (run_gpu.log). --pack DIR: after every step, DIR/gpu_results.tgz (all of OUT_DIR) and DIR/run_gpu.log are
# refreshed, so a run cut off by its caller's limit still returns what it finished (the device tool returns at
# most 8 files: pass --pack "$OUT"). BUDGET_S (default 530 s) bounds the whole run: a step gets at most what is
# left, and a step that cannot get its minimum is skipped and reported. A lend is 15 device-minutes, machine
# start included: one call of `bash benchmarks/run_gpu.sh --pack "$OUT"` with timeout_s 560 (docs/benchmarks.md,
# "The GPU day", has the whole recipe, including the wheels to carry: loralib and bitsandbytes are not on the
# device image; `bash benchmarks/gpu_wheels.sh` fetches them into .whl/, which this script installs from).
#
# Steps, in this order (each with its own limit; a failing step is reported and the next one runs):
#   1 probe   python -m benchmarks.gpu_probe: forward / base GEMM, the cuBLAS composite, forward+backward vs PEFT
#             and vs the two base GEMMs, d 4096 and 8192, bf16, eager and CUDA-graph replay (gpu_probe_*.csv)
#   2 tests   the GPU parity tests (tests/kernels/test_gpu.py: compiled kernels vs float64 and PEFT, fp32 adapters on a
#             half base; autocast; CUDA-graph capture), a line per test in gpu_tests_live.txt as it ends
#   3 train   benchmarks.train_step at Llama-3.2-1B dimensions, then its 4-bit variant (--qlora)
#   4 multi   bench_multi: multi-adapter decode / prefill layer, eager and CUDA-graph replay, whole-model decode;
#     moe     bench_moe: LoRA on MoE experts, PEFT target_parameters vs fastlora, and vs LoRA on attention only
#   5 paper   the paper table's batch-1 columns: batch 1 / seq 128 and decode (benchmarks.paper_table)
#   6 tune    python -m fastlora.tune, then the probe again with the tuned cache (gpu_probe_*_tuned.csv)
#
# --dry-run: the same steps on the CPU at toy sizes (no timing claims), under 5 minutes; exit 0 when every step
# ran. CI runs it. The exit status is the number of failed steps (skipped ones count as failed).
set -u
cd "$(dirname "$0")/.."
DRY=0 PACK="" OUT_ARG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --pack) PACK=$(realpath -m "$2"); shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "run_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT_ARG=$1 ;;
    esac
    shift
done
OUT_DIR=$(realpath -m "${OUT_ARG:-benchmarks/out/gpu}")
mkdir -p "$OUT_DIR" ${PACK:+"$PACK"}
BUDGET_S=${BUDGET_S:-$([ $DRY = 1 ] && echo 290 || echo 530)}
LOG="$OUT_DIR/run_gpu.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 FASTLORA_BENCH_OUT="$OUT_DIR" FASTLORA_TUNE_CACHE="$OUT_DIR/tune.json"
export TRITON_INTERPRET=0          # tests/conftest.py would set 1; compiled kernels here (CPU dry run: torch path)
failed=0
say() { echo "=== $(date -u +%T) [${SECONDS}s] $*" | tee -a "$LOG"; }
pack() {
    [ -n "$PACK" ] || return 0
    tar czf "$PACK/gpu_results.tgz.part" -C "$OUT_DIR" . 2>/dev/null && mv "$PACK/gpu_results.tgz.part" "$PACK/gpu_results.tgz"
    cp "$LOG" "$PACK/run_gpu.log"
}
step() {     # step NAME LIMIT MIN CMD...: CMD under min(LIMIT, budget left); skipped when less than MIN is left
    local name=$1 limit=$2 min=$3; shift 3
    local left=$((BUDGET_S - SECONDS))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt "$min" ]; then
        say "$name SKIPPED: ${left}s of the ${BUDGET_S}s budget left, needs ${min}s"
        failed=$((failed + 1)); pack; return 0
    fi
    say "$name [limit ${limit}s] $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    say "$name rc=$rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    pack
}

# Python packages the device image lacks travel as wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastlora_site \
        .whl/*.whl 2>&1 | tail -n 3 | tee -a "$LOG"
    export PYTHONPATH="/tmp/fastlora_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
    if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        say "no CUDA device: run with --dry-run on a CPU"; pack; exit 1
    fi
fi
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'peft', peft.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$LOG"

if [ $DRY = 1 ]; then    # toy sizes, CPU; every step below runs the same code path as on the GPU
    export FASTLORA_BENCH_TINY=1 FASTLORA_BENCH_ROUNDS=2 FASTLORA_BENCH_THREADS=2 MOE_ROUNDS=2
    PROBE=(--device cpu --dims 64 --tokens 32 --dtype float32)
    TRAIN=(--quick --rounds 2 --warmup 1)
    PAPER=(--quick --device cpu --n-layer 2 --n-embd 64 --n-head 4 --bottleneck 4)
    TUNE=(env TRITON_INTERPRET=1 python3 -m fastlora.tune --device cpu --tokens 16 --dims 32 --ranks 4 --dtype fp32)
else
    PROBE=() TRAIN=() PAPER=(--device cuda --columns 1x128,decode --trials 50)
    TUNE=(python3 -m fastlora.tune --tokens 128 4096 --dims 4096 8192 --ranks 16)
fi
# the GPU tests (on a CPU every one of them skips: the dry run checks that they collect)
TESTS=(tests/kernels/test_gpu.py tests/ops/test_autocast.py::test_patched_peft_under_cuda_autocast
       tests/kernels/test_multi_kernels.py::test_cuda_graph_capture
       tests/kernels/test_multi_kernels.py::test_cuda_graph_capture_with_a_plan_refilled_in_place
       tests/kernels/test_multi_kernels.py::test_cuda_graph_captures_a_whole_model_decode_shaped_step
       tests/ops/test_moe.py::test_gpu_parity_bf16 tests/ops/test_moe.py::test_gpu_cuda_graph_capture)
par=$([ $DRY = 0 ] && python3 -c "import xdist" 2>/dev/null && echo "-n ${JOBS:-12}")
export FASTLORA_LIVE_REPORT="$OUT_DIR/gpu_tests_live.txt"

step probe 100 20 python3 -m benchmarks.gpu_probe "${PROBE[@]}"
step tests 170 30 python3 -m pytest -q $par -p no:cacheprovider -p tests._live_report -rfE --tb=short "${TESTS[@]}"
step train 75 30 python3 -m benchmarks.train_step "${TRAIN[@]}"
step train4bit 60 30 python3 -m benchmarks.train_step --qlora "${TRAIN[@]}"
step multi 60 20 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_multi.py --benchmark-only
step moe 60 20 python3 -m benchmarks.bench_moe --rounds "${MOE_ROUNDS:-10}"
step paper 60 20 python3 -m benchmarks.paper_table --no-progress "${PAPER[@]}"
step tune 60 20 "${TUNE[@]}"
step reprobe 60 20 python3 -m benchmarks.gpu_probe --suffix tuned --no-profile "${PROBE[@]}"
say "$failed step(s) failed or skipped; results in $OUT_DIR${PACK:+, packed in $PACK}"
pack
exit "$failed"
