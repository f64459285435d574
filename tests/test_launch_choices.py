"""The launchers' host-side choices, which only a GPU would otherwise exercise: dot precision per
dtype pair, the forward variant, the rank block and the autotune tile list.

An H200 run (benchmarks/results/h200_2026-11-26/) showed fp32 adapters on a half base getting dA with
~2^-11 relative errors from tf32 dots; these choices are the fix, and the CPU suite cannot run tf32,
so here they are pinned down directly.
"""
from __future__ import annotations

import pytest
import torch

from fastlora.kernels import _common, linear_bwd, linear_fwd, multi_lora
from fastlora.kernels._torch_compat import cuda_matmul_tf32

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("x_dtype", HALF)
def test_fp32_adapters_on_half_base_get_tf32x3_for_gradient_dots(x_dtype):
    assert _common.lora_precision(x_dtype, torch.float32) == "tf32x3"
    assert _common.lora_precision(x_dtype, x_dtype) == "tf32"          # S / dS rounded next to half data
    assert _common.fp32_precision(x_dtype) == "tf32"                   # y and dx are rounded to half


def test_fp32_base_follows_torch_matmul_setting():
    # set and restored through torch's current API (fp32_precision) where it exists; the kernels must read
    # it through the same API (reading the deprecated allow_tf32 after it raises in torch >= 2.9)
    with cuda_matmul_tf32(False):
        assert _common.lora_precision(torch.float32, torch.float32) == "ieee"
    with cuda_matmul_tf32(True):
        assert _common.lora_precision(torch.float32, torch.float32) == "tf32"
        assert _common.lora_precision(torch.float64, torch.float64) == "ieee"


def test_rank_block_is_capped_for_tf32x3():
    assert [_common.block_r(r) for r in (1, 16, 17, 64, 200)] == [16, 16, 32, 64, 64]
    assert [_common.block_r(r, "tf32x3") for r in (1, 16, 17, 64, 200)] == [16, 16, 32, 32, 32]


def test_forward_variant_choice(monkeypatch):
    monkeypatch.delenv("FASTLORA_FWD_VARIANT", raising=False)
    choose = linear_fwd._choose_variant
    assert choose(None, None, 16, 0.0, on_gpu=False) == "one"
    assert choose(None, None, 16, 0.1, on_gpu=False) == "two"
    assert choose(None, None, 17, 0.0, on_gpu=False) == "two"           # S too wide for the GEMM tile
    assert choose(None, None, 16, 0.0, on_gpu=False, x3_s=True) == "two"
    monkeypatch.setenv("FASTLORA_FWD_VARIANT", "one")
    assert choose(None, None, 16, 0.1, on_gpu=True) == "one"             # a pin wins where it can
    assert choose(None, None, 16, 0.0, on_gpu=True, x3_s=True) == "two"   # ... but not over exactness
    monkeypatch.setenv("FASTLORA_FWD_VARIANT", "three")
    with pytest.raises(ValueError, match="FASTLORA_FWD_VARIANT"):
        choose(None, None, 16, 0.0, on_gpu=False)


@pytest.mark.parametrize("kernel,configs_of,pointer", [
    ("shrink", linear_fwd._shrink_configs, "x_ptr"), ("gemm", linear_fwd._gemm_configs, "x_ptr"),
    ("dsdb", linear_bwd._dsdb_configs, "dy_ptr")])
def test_autotune_prunes_to_the_tile_list_of_the_dtype_and_precision(kernel, configs_of, pointer, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)          # the GPU tile lists
    prune = (linear_bwd._prune_by_dtype(configs_of, pointer) if kernel == "dsdb"
             else linear_fwd._prune_by_dtype(configs_of))
    every = _common.union(configs_of(False), configs_of(True))
    half, fp32 = ({str(c) for c in configs_of(f)} for f in (False, True))
    assert half != fp32
    names = lambda cs: {str(c) for c in cs}  # noqa: E731
    bf16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert names(prune(every, {pointer: bf16}, FP32_PRECISION="tf32")) == half
    assert names(prune(every, {pointer: bf16}, FP32_PRECISION="tf32x3")) == fp32
    assert names(prune(every, {pointer: f32}, FP32_PRECISION="ieee")) == fp32


def test_multi_shrink_block_for_tf32x3(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert multi_lora._cfg("shrink", "grouped", "tf32x3")["BLOCK_C"] < multi_lora._cfg("shrink", "grouped")["BLOCK_C"]
    for kernel in ("shrink", "expand", "grad"):          # the token plan's BLOCK_M never depends on precision
        assert multi_lora._cfg(kernel, "decode", "tf32x3")["BLOCK_M"] == multi_lora._cfg(kernel, "decode")["BLOCK_M"]


def test_large_gemm_tiles_only_for_the_two_launch_forward(monkeypatch):
    """128x256 / 256x128 tiles spill next to the one-launch kernel's S tile (python -m fastlora.inspect):
    the autotuner sees them only for the two-launch GEMM."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prune = linear_fwd._prune_by_dtype(linear_fwd._gemm_configs)
    every = _common.union(linear_fwd._gemm_configs(False, one_launch=False),
                          linear_fwd._gemm_configs(True, one_launch=False))
    x = {"x_ptr": torch.empty(1, dtype=torch.bfloat16)}
    tiles = lambda one: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])  # noqa: E731
                         for c in prune(every, x, SHRINK_IN_LOOP=one, FP32_PRECISION="tf32")}
    big = {(128, 256), (256, 128)}
    assert big <= tiles(False) and not big & tiles(True)
    assert tiles(True) < tiles(False)


def test_backward_variant_choice(monkeypatch):
    """"split" (dx on the forward's GEMM) only serves calls without dropout that need dx; off the GPU the
    fused kernel is the default; a pin applies where the variant is free; a bad pin is an error."""
    from fastlora.kernels import linear_bwd
    monkeypatch.delenv("FASTLORA_BWD_VARIANT", raising=False)
    choose = linear_bwd._choose_bwd_variant
    never = lambda v: (_ for _ in ()).throw(AssertionError("no timing off the GPU"))  # noqa: E731
    assert choose(never, None, 0.0, True, on_gpu=False) == "fused"
    monkeypatch.setenv("FASTLORA_BWD_VARIANT", "split")
    assert choose(never, None, 0.0, True, on_gpu=False) == "split"
    assert choose(never, None, 0.1, True, on_gpu=True) == "fused"       # the GEMM epilogue does not mask
    assert choose(never, None, 0.0, False, on_gpu=True) == "fused"      # no dx: nothing to split
    monkeypatch.setenv("FASTLORA_BWD_VARIANT", "both")
    with pytest.raises(ValueError, match="FASTLORA_BWD_VARIANT"):
        choose(never, None, 0.0, True, on_gpu=False)
