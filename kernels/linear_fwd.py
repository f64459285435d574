"""LoRA linear, forward — the anchored plan: Triton writes the low-rank term, cuBLAS accumulates the base GEMM.

    S  = dropout(x)·Aᵀ = (x ⊙ keep)·Aᵀ / (1 − p)      (M, r)  fp32        _lora_shrink_kernel  (reads x once)
    y  = s · S·Bᵀ + bias                              (M, N)  y's dtype   _lora_expand_kernel  (writes y once)
    y += x·W0ᵀ                                        cuBLAS addmm_ with beta = 1 (reads y once more)

Shapes: x (M, K) with any row / column strides · W0 (N, K), or (K, N) for fan_in_fan_out (GPT-2 Conv1D; a
transposed view for cuBLAS, never a copy) · bias (N,) · A (r, K) · B (N, r) · S (M, r) fp32 (fp64 for fp64 x)
· y (M, N) in x's dtype. An x whose leading dims do not collapse into one row stride is copied once (cuBLAS
needs a matrix).

Rounding: y = round(round(s·S·Bᵀ + bias) + x·W0ᵀ) — two roundings, like PEFT and the torch composite; S stays
fp32 (saved for backward). Dropout: keep = uniform(Philox(seed, row·⌈K/4⌉ + col // 4)[col % 4]) ≥ p
(_common._keep, = fastlora.core.dropout.keep_mask); p = 0 draws nothing. The K-loop of the shrink and the rank loop
of the expand are kernels/_tiles.py's, shared with the multi-adapter kernels; configs: kernels/policy.py.
A half W0 under float32 x (fastlora.ops.qlora: the QLoRA recipe's float32 activations into a bf16/fp16-compute
layer): the expand writes s·S·Bᵀ in fp32, then torch adds the base GEMM + bias computed in W0's dtype on x cast
to it (bitsandbytes' maths).
Why not one fused GEMM: our own Triton GEMM was slower than cuBLAS on a GPU (docs/benchmarks.md, "GPU: one
NVIDIA H200"); the LoRA work is memory-bound and fits around cuBLAS instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import policy
from ._layout import weight_nk
from ._tiles import _expand_tile, _shrink_tile, _span
from ._specs import SPEC_DTYPES, CompileSpec, cfg_name, shipped, specialize

# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr,
    # sizes
    M, K, R,
    # dropout
    p, inv_keep,
    # strides
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[rows, rank block] = (x ⊙ keep)[rows, :]·Aᵀ[:, rank block] / (1 − p).  Grid (M / BLOCK_M, R / BLOCK_R)."""
    rm, m_ok = _span(tl.program_id(0), BLOCK_M, M)
    rr, r_ok = _span(tl.program_id(1), BLOCK_R, R)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar          # (BLOCK_K, BLOCK_R) of Aᵀ
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=s_ptr.dtype.element_ty)   # fp32 (fp64 for fp64 inputs)
    acc = _shrink_tile(acc, x_ptrs, a_ptrs, stride_xk, stride_ak, rm, m_ok, r_ok, K, K, seed, p,
                       HAS_DROPOUT, FP32_PRECISION, BLOCK_M, BLOCK_K)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc * inv_keep, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    # pointers
    s_ptr, b_ptr, bias_ptr, y_ptr, scale_ptr,
    # sizes
    M, N, R,
    # strides
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[rows, cols] = s·S[rows, :]·Bᵀ[:, cols] + bias[cols], rounded once to y's dtype; the rank is walked in
    chunks of BLOCK_R. Grid (M / BLOCK_M, N / BLOCK_N)."""
    rm, m_ok = _span(tl.program_id(0), BLOCK_M, M)
    rn, n_ok = _span(tl.program_id(1), BLOCK_N, N)

    ACC = s_ptr.dtype.element_ty                                                # fp32 (fp64 for fp64 inputs)
    # S[rows, :] and Bᵀ[:, cols] (B[cols, j] at cols·stride_bn + j·stride_br)
    acc = _expand_tile(s_ptr, rm * stride_sm, stride_sr, b_ptr, rn * stride_bn, stride_br, m_ok, n_ok, R,
                       tl.load(scale_ptr).to(ACC), bias_ptr + rn, ACC, True, HAS_BIAS, FP32_PRECISION,
                       BLOCK_M, BLOCK_N, BLOCK_R)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def shrink(x2, lora_A, S, seed, p: float, precision: str) -> None:
    """S (M, r) = drop(x2)·Aᵀ / (1 − p), written in place."""
    M, K = x2.shape
    R = lora_A.shape[0]
    cfg = policy.config("shrink", x2.dtype, precision, M, K, R, x2.device, dropout=p > 0)
    meta, opts = policy.launch_options(cfg)
    BR = policy.block_r(R, precision)
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BR))
    _lora_shrink_kernel[grid](
        x2, lora_A, S, seed, M, K, R, p, 1.0 / (1.0 - p),
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), S.stride(0), S.stride(1),
        HAS_DROPOUT=p > 0, FP32_PRECISION=precision, BLOCK_R=BR, **meta, **opts)


def expand(S, lora_B, bias, y, scale, precision: str) -> None:
    """y (M, N) = s·S·Bᵀ + bias in y's dtype, written in place (every element)."""
    M, N = y.shape
    R = S.shape[1]
    cfg = policy.config("expand", y.dtype, precision, M, N, R, y.device)
    meta, opts = policy.launch_options(cfg)
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _lora_expand_kernel[grid](
        S, lora_B, bias if bias is not None else y, y, scale, M, N, R,
        S.stride(0), S.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, FP32_PRECISION=precision, BLOCK_R=policy.CHUNK_R, **meta, **opts)


def lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s):
    """Returns (y (..., N) in x's dtype, S (M, r) fp32 (fp64 for fp64 x) — (0, r) when not ``save_s``)."""
    w = weight_nk(weight, fan_in_fan_out)
    N, K = w.shape
    R = lora_A.shape[0]
    x2 = x.reshape(-1, K)                      # a view whenever x's strides allow it
    M = x2.shape[0]
    acc = policy.acc_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    S = torch.empty((M, R), device=x.device, dtype=acc)
    if M:
        p = float(dropout_p)
        prec = policy.fp32_precision(x.dtype)
        mixed = w.dtype != x.dtype             # a half W0 under fp32 x: the base GEMM runs in W0's dtype
        # S feeds dB when saved: gradient-grade precision then (fp32 adapters on a half base: tf32x3)
        shrink(x2, lora_A, S, seed, p, policy.lora_precision(x.dtype, lora_A.dtype) if save_s else prec)
        expand(S, lora_B, None if mixed else bias, y, scale, prec)
        if mixed:
            xb = x2.to(w.dtype)
            y.add_(torch.addmm(bias, xb, w.t()) if bias is not None else xb @ w.t())
        else:
            y.addmm_(x2, w.t())                # cuBLAS: y = y0 + x·W0ᵀ (beta = 1)
    return y.reshape(*x.shape[:-1], N), (S if save_s else S[:0])


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect (compile for sm_80 / sm_90 without a GPU)
# ---------------------------------------------------------------------------

# A typical launch (contiguous tensors, 4096-sized dims, rank 64 = the largest rank block) for the compile check;
# dtype pairs and precisions: _specs.SPEC_DTYPES.
SPEC_M = SPEC_N = SPEC_K = 4096
SPEC_R = policy.MAX_BLOCK_R
SPEC_VALUES = dict(M=SPEC_M, N=SPEC_N, K=SPEC_K, R=SPEC_R, stride_xm=SPEC_K, stride_xk=1, stride_ar=SPEC_K,
                   stride_ak=1, stride_bn=SPEC_R, stride_br=1, stride_sm=SPEC_R, stride_sr=1, stride_ym=SPEC_N,
                   stride_yn=1)


def compile_specs():
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for drop in (False, True):
            # S for y only (eval: prec) and S saved for dB (training: lprec), each with its tile list
            for sprec in dict.fromkeys((prec, lprec)):
                for cfg in shipped("shrink", xdt, sprec, drop):
                    meta, opts = policy.launch_options(cfg)
                    meta.update(HAS_DROPOUT=drop, FP32_PRECISION=sprec, BLOCK_R=policy.block_r(SPEC_R, sprec))
                    sig, consts, attrs = specialize(_lora_shrink_kernel, meta, {
                        "x_ptr": xdt, "a_ptr": adt, "s_ptr": "fp32", "seed_ptr": "i64"}, SPEC_VALUES,
                        floats=("p", "inv_keep"))
                    specs.append(CompileSpec(
                        f"lora_shrink x={xdt} ab={adt}/{sprec} drop={int(drop)} {cfg_name(cfg)} r{meta['BLOCK_R']}",
                        _lora_shrink_kernel, sig, consts, opts["num_warps"], opts["num_stages"], attrs=attrs))
        for cfg in shipped("expand", xdt, prec):
            meta, opts = policy.launch_options(cfg)
            meta.update(HAS_BIAS=True, FP32_PRECISION=prec, BLOCK_R=policy.CHUNK_R)
            sig, consts, attrs = specialize(_lora_expand_kernel, meta, {
                "s_ptr": "fp32", "b_ptr": adt, "bias_ptr": xdt, "y_ptr": xdt, "scale_ptr": "fp32"}, SPEC_VALUES)
            specs.append(CompileSpec(f"lora_expand x={xdt} ab={adt}/{prec} {cfg_name(cfg)} r{policy.CHUNK_R}",
                                     _lora_expand_kernel, sig, consts, opts["num_warps"], opts["num_stages"],
                                     attrs=attrs))
    return specs


__all__ = ["lora_fwd", "shrink", "expand", "compile_specs"]
