"""Pieces shared by the LoRA kernels: jit helpers (dropout mask, mixed-dtype MMA, strided x rows)
and launcher helpers (views of x without copies, block sizes, config lists per target)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------


@triton.jit
def _x_row_offsets(rows, T, stride_xb, stride_xt):
    """Element offsets (int64) of x's rows for x viewed as (M // T, T, K) with arbitrary strides.

    A 2-D x is T = M, stride_xb = 0; a 3-D x whose leading dims do not collapse into one stride
    (e.g. (B, T, K).transpose(0, 1)) is read in place instead of being copied.
    """
    rows = rows.to(tl.int64)
    return (rows // T) * stride_xb + (rows % T) * stride_xt


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program over an (M, N) output in grouped order: GROUP_M row tiles run
    together and share their column tiles in L2 (the Triton matmul tutorial's swizzle)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m


@triton.jit
def _keep(seed, rows, col0, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dropout keep-mask (BLOCK_M, BLOCK_K) for x seen as (M, K), columns col0 .. col0 + BLOCK_K − 1
    (col0 a multiple of 4). One Philox call per 4 columns: counter row·⌈K/4⌉ + col // 4, word col % 4.

    Bit-identical to fastlora.dropout.keep_mask; regenerated wherever needed, never stored.
    """
    counters = rows.to(tl.int64)[:, None] * ((K + 3) // 4) + (col0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    # interleave so column 4j + i takes word i of counter j
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_K))
    return u >= p


@triton.jit
def _mma(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc += a·b, accumulated in acc's dtype (fp32; fp64 for fp64 inputs). Equal dtypes go to the
    tensor cores as they are; mixed operands (fp32 adapters or fp32 S on a half base) are both
    promoted to acc's dtype."""
    if a.dtype == b.dtype:
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision=FP32_PRECISION)


# ---------------------------------------------------------------------------
# launcher helpers
# ---------------------------------------------------------------------------

# Rank blocking. The GEMM kernels walk the rank in chunks of GEMM_BLOCK_R (16): S / dS chunks and the
# matching A / B chunks stay small next to the (BLOCK_M, BLOCK_N) accumulator, so no config spills.
# The one-launch forward keeps all of S (BLOCK_M × 16, fp32) in registers through the K-loop, so it
# serves r ≤ MAX_FUSED_R = 16 (the ranks LoRA is usually run at); larger ranks take the two-launch path.
GEMM_BLOCK_R = 16
MAX_FUSED_R = GEMM_BLOCK_R
MAX_BLOCK_R = 64   # the skinny kernels (shrink, dS/dB) hold up to 64 ranks per program


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def x_as_3d(x: torch.Tensor):
    """Describe x (..., K) as (M // T, T, K) with strides, without a copy where strides allow.

    Returns (x_used, M, T, stride_xb, stride_xt, stride_xk). Leading dims collapse into one row
    index when their strides allow it; a 3-D x that does not collapse (e.g. (B, T, K).transpose(0, 1))
    keeps its batch stride apart. Only a 4-D+ x that fits neither is reshaped (copied).
    """
    K = x.shape[-1]
    for _ in range(2):
        try:
            v = x.view(-1, K)
            return x, v.shape[0], max(v.shape[0], 1), 0, v.stride(0), v.stride(1)
        except RuntimeError:
            pass
        try:
            v = x.view(-1, x.shape[-2], K)
            return x, v.shape[0] * v.shape[1], max(v.shape[1], 1), v.stride(0), v.stride(1), v.stride(2)
        except RuntimeError:
            x = x.reshape(-1, K)
    raise AssertionError("unreachable: a reshaped tensor always views")


MAX_BLOCK_R_X3 = 32  # with tf32x3 dots (lora_precision) a 64-rank block spills: the operands are split in two


def block_r(r: int, precision: str = "tf32") -> int:
    """Rank block of the skinny kernels: a tl.dot-legal power of two ≥ 16, at most MAX_BLOCK_R
    (MAX_BLOCK_R_X3 for tf32x3 dots)."""
    return max(16, min(triton.next_power_of_2(r), MAX_BLOCK_R_X3 if precision == "tf32x3" else MAX_BLOCK_R))


def acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Accumulator / S / partial-buffer dtype: float32, float64 for float64 inputs (gradcheck)."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def fp32_precision(x_dtype: torch.dtype) -> str:
    """input_precision for fp32 dots: follow torch's matmul setting on an fp32 base; tf32 on a half
    base (there fp32 only carries adapters/S, whose contribution is rounded to half at the end)."""
    if x_dtype in (torch.float32, torch.float64):
        return "tf32" if x_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """input_precision of the dots whose fp32 results are, or feed, adapter gradients: S = x·Aᵀ
    (saved for dB), dS = s·dY·B, dB = s·dYᵀ·S, dA = dSᵀ·x. fp32 adapters on a half base (PEFT's
    default) get "tf32x3" (three tf32 products: about fp32 accuracy, as PEFT's fp32 matmuls); plain
    tf32 there left dA with ~2^-11 relative errors, 460-9100x PEFT's (tests/test_gpu.py on an H200,
    2026-11-26). Every other case: fp32_precision. Dots whose results are rounded to half (y, dx) keep
    fp32_precision."""
    if x_dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32:
        return "tf32x3"
    return fp32_precision(x_dtype)


def is_fp32_input(named_args: dict, pointer: str) -> bool:
    """For autotune pruning: does the kernel's ``pointer`` argument hold fp32 (or fp64) data?"""
    t = named_args.get(pointer)
    return getattr(t, "dtype", None) in (torch.float32, torch.float64)


def wants_fp32_tiles(named_args: dict, pointer: str, meta: dict) -> bool:
    """For autotune pruning: the fp32 tile list serves fp32 data, and tf32x3 dots (fp32 adapters on a
    half base, lora_precision), whose split operands need the registers of fp32 tiles."""
    prec = meta.get("FP32_PRECISION", named_args.get("FP32_PRECISION"))
    return is_fp32_input(named_args, pointer) or prec == "tf32x3"


def union(*config_lists):
    """Configs of several lists, each once (the interpreter's lists are one identical config)."""
    seen, out = set(), []
    for c in (c for lst in config_lists for c in lst):
        if str(c) not in seen:
            seen.add(str(c))
            out.append(c)
    return out


def m_bucket(M: int) -> int:
    """Autotune key for the token count: next power of two (so a new M rarely re-tunes)."""
    return triton.next_power_of_2(max(M, 1))

