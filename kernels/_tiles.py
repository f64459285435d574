"""Tile bodies shared by the single-adapter kernels (linear_fwd.py) and the multi-adapter kernels (multi_lora.py),
written once; Triton inlines them into each kernel.

    _span          one program's block of indices along a dimension, and its tail mask
    _shrink_tile   acc += drop(x)[rows, 0:k_end]·Aᵀ[0:k_end, ranks]      the K-loop of S = drop(x)·Aᵀ (and dS = dY·B)
    _expand_tile   (σ·S[rows, 0:rank])·W[0:rank, cols] (+ bias[cols])    the rank loop of y0 = s·S·Bᵀ + bias (and dS·A)

The caller builds the pointer blocks (rows from a range, or the batch plan's gathered tokens; its own address
width), passes the masks, and finishes the tile (1/(1−p), a per-adapter scale, the keep-mask of an output, the
store). Accumulation in acc's dtype (fp32; fp64 for fp64 inputs), dots through _common._mma.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _keep, _mma


@triton.jit
def _span(pid, BLOCK: tl.constexpr, size):
    """(pid·BLOCK + [0, BLOCK), mask of the indices < size): a program's rows, columns or ranks."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < size


@triton.jit
def _shrink_tile(acc, x_ptrs, a_ptrs, stride_xk, stride_ak, rows, m_ok, r_ok, k_end, K, seed, p,
                 HAS_DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_R) + (x ⊙ keep)[rows, 0:k_end]·Aᵀ[0:k_end, ranks], in steps of BLOCK_K along K.

    x_ptrs (BLOCK_M, BLOCK_K): x[rows, 0:BLOCK_K] · a_ptrs (BLOCK_K, BLOCK_R): Aᵀ[0:BLOCK_K, ranks] · m_ok, r_ok:
    the rows' and ranks' masks · K: x's width (the reduction tail and the keep-mask's geometry) · k_end: K, or 0
    for a program with no work · keep = _keep(seed, rows, col, K, p), drawn only when HAS_DROPOUT."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rows, k0, K, p, BLOCK_M, BLOCK_K), x, 0.0)
        acc = _mma(x, a, acc, FP32_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _expand_tile(s_ptr, s_rows, stride_sr, w_ptr, w_cols, stride_wr, m_ok, c_ok, rank, scale, bias_ptrs,
                 ACC: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """(σ·S[rows, 0:rank])·W[0:rank, cols] (+ bias[cols]) as an ACC (BLOCK_M, BLOCK_N) tile; the rank is walked in
    chunks of BLOCK_R, so the output tile never shares registers with a wide S.

    s_ptr: S[·, 0] · s_rows (BLOCK_M,): the rows' offsets in S (rows·stride_sm) · w_ptr: W[0, ·] · w_cols (BLOCK_N,):
    the columns' offsets in W (cols·stride_wc) · m_ok, c_ok: the rows' and columns' masks; ranks ≥ rank are never
    read (S past a token's rank may be unset) · σ = scale, applied to S (the (M, r) side) when HAS_SCALE ·
    bias_ptrs (BLOCK_N,): bias[cols], read when HAS_BIAS. Addresses are formed per chunk from the 1-D offsets (no
    2-D pointer block lives across the loop: fewer registers)."""
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + rr
        j_ok = j < rank
        s = tl.load(s_ptr + s_rows[:, None] + j[None, :] * stride_sr, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        w = tl.load(w_ptr + j[:, None] * stride_wr + w_cols[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_SCALE:
            s = s * scale
        acc = _mma(s, w, acc, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptrs, mask=c_ok, other=0.0).to(ACC)[None, :]
    return acc
