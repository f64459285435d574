#!/usr/bin/env bash
# Fetch, on the CPU machine, the wheels the GPU device image lacks, into .whl/ (git-ignored), for
# `bash benchmarks/run_gpu.sh`, which installs them there (the device reaches no package index). The image holds
# torch, triton, transformers, peft, pytest(-xdist, -benchmark), hypothesis, safetensors, matplotlib, tqdm
# (.library/device/KINDS.md); it lacks loralib and bitsandbytes. Its Python is 3.12 on x86-64.
#     bash benchmarks/gpu_wheels.sh          # then carry .whl in the device call (docs/benchmarks.md, "The GPU day")
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "bitsandbytes>=0.50" "loralib>=0.1.2"
ls -la .whl
du -sh .whl
