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
(_common._keep, = fastlora.dropout.keep_mask); p = 0 draws nothing.
A half W0 under float32 x (fastlora.qlora: the QLoRA recipe's float32 activations into a bf16/fp16-compute
layer): the expand writes s·S·Bᵀ in fp32, then torch adds the base GEMM + bias computed in W0's dtype on x cast
to it (bitsandbytes' maths).
Why not one fused GEMM: on an H200 our Triton GEMM reached ~490 TFLOP/s where cuBLAS reached ~770
(benchmarks/results/h200_2026-11-26); the LoRA work is memory-bound and fits around cuBLAS instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import policy
from ._common import _keep, _mma
from ._specs import CompileSpec, specialize

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
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R

    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar          # (BLOCK_K, BLOCK_R) of Aᵀ
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=s_ptr.dtype.element_ty)   # fp32 (fp64 for fp64 inputs)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rm, k0, K, p, BLOCK_M, BLOCK_K), x, 0.0)
        acc = _mma(x, a, acc, FP32_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N

    ACC = s_ptr.dtype.element_ty                                                # fp32 (fp64 for fp64 inputs)
    scale = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        s_tile = tl.load(s_ptr + rm[:, None] * stride_sm + (r0 + rr)[None, :] * stride_sr,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_R)
        b = tl.load(b_ptr + (r0 + rr)[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)              # (BLOCK_R, BLOCK_N) of Bᵀ
        acc = _mma(s_tile * scale, b, acc, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def shrink(x2, lora_A, S, seed, p: float, precision: str) -> None:
    """S (M, r) = drop(x2)·Aᵀ / (1 − p), written in place."""
    M, K = x2.shape
    R = lora_A.shape[0]
    cfg = policy.config("shrink", x2.dtype, precision, M, K, R, x2.device)
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


def weight_nk(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W0 as (N, K): a transposed view of a GPT-2 Conv1D weight stored (K, N)."""
    return weight.t() if fan_in_fan_out else weight


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

# A typical launch (contiguous tensors, 4096-sized dims, rank 64 = the largest rank block) for the compile check.
SPEC_M = SPEC_N = SPEC_K = 4096
SPEC_R = policy.MAX_BLOCK_R
# (x dtype, adapter dtype, fp32 dot precision, precision of the gradient-feeding dots (lora_precision)):
# half bases (fp32 adapters: tf32x3 there), fp32 with torch's default (ieee) and with tf32 allowed
SPEC_DTYPES = (("bf16", "bf16", "tf32", "tf32"), ("bf16", "fp32", "tf32", "tf32x3"), ("fp16", "fp16", "tf32", "tf32"),
               ("fp32", "fp32", "ieee", "ieee"), ("fp32", "fp32", "tf32", "tf32"))
SPEC_VALUES = dict(M=SPEC_M, N=SPEC_N, K=SPEC_K, R=SPEC_R, stride_xm=SPEC_K, stride_xk=1, stride_ar=SPEC_K,
                   stride_ak=1, stride_bn=SPEC_R, stride_br=1, stride_sm=SPEC_R, stride_sr=1, stride_ym=SPEC_N,
                   stride_yn=1)


_SPEC_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def spec_tier(xdt: str, prec: str) -> str:
    """policy.tier of a compile spec's dtype name: the check compiles exactly the lists the launches use."""
    return policy.tier(_SPEC_TORCH[xdt], prec)


def _cfg_name(cfg: dict) -> str:
    blocks = "x".join(str(v) for k, v in cfg.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{cfg['num_warps']} s{cfg['num_stages']}"


def compile_specs():
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for drop in (False, True):
            # S for y only (eval: prec) and S saved for dB (training: lprec), each with its tile list
            for sprec in dict.fromkeys((prec, lprec)):
                for cfg in policy.CANDIDATES["shrink"][spec_tier(xdt, sprec)]:
                    meta, opts = policy.launch_options(cfg)
                    meta.update(HAS_DROPOUT=drop, FP32_PRECISION=sprec, BLOCK_R=policy.block_r(SPEC_R, sprec))
                    sig, consts, attrs = specialize(_lora_shrink_kernel, meta, {
                        "x_ptr": xdt, "a_ptr": adt, "s_ptr": "fp32", "seed_ptr": "i64"}, SPEC_VALUES,
                        floats=("p", "inv_keep"))
                    specs.append(CompileSpec(
                        f"lora_shrink x={xdt} ab={adt}/{sprec} drop={int(drop)} {_cfg_name(cfg)} r{meta['BLOCK_R']}",
                        _lora_shrink_kernel, sig, consts, opts["num_warps"], opts["num_stages"], attrs=attrs))
        for cfg in policy.CANDIDATES["expand"][spec_tier(xdt, prec)]:
            meta, opts = policy.launch_options(cfg)
            meta.update(HAS_BIAS=True, FP32_PRECISION=prec, BLOCK_R=policy.CHUNK_R)
            sig, consts, attrs = specialize(_lora_expand_kernel, meta, {
                "s_ptr": "fp32", "b_ptr": adt, "bias_ptr": xdt, "y_ptr": xdt, "scale_ptr": "fp32"}, SPEC_VALUES)
            specs.append(CompileSpec(f"lora_expand x={xdt} ab={adt}/{prec} {_cfg_name(cfg)} r{policy.CHUNK_R}",
                                     _lora_expand_kernel, sig, consts, opts["num_warps"], opts["num_stages"],
                                     attrs=attrs))
    return specs


__all__ = ["lora_fwd", "shrink", "expand", "weight_nk", "compile_specs"]
