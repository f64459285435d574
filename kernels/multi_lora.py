"""Batched multi-adapter LoRA (gather-matmul): every token picks its own adapter, forward and backward.

    y[m] = x[m]·W0ᵀ + bias + s_k · S[m]·B_kᵀ        S[m] = drop(x)[m]·A_kᵀ,  k = ids[m]  (−1: base only)

Shapes. x (M, K) · W0 (N, K), or (K, N) with fan_in_fan_out · bias (N,) · ids (M,) int32 in [−1, n) ·
adapter bank packed WITHOUT padding along the rank: A (R_tot, K) rows off[k] … off[k+1]−1 are A_k (r_k, K),
B (N, R_tot) columns off[k] … off[k+1]−1 are B_k (N, r_k), R_tot = Σ r_k · off (n+1,) int32 ·
scales (n,) float32 (runtime values, never constexpr) · pk (n, 2) float32 (p_k, 1/(1−p_k)) · S (M, r_max) float32, S[m, j] for j < r_{ids[m]}
(other entries unset: never read) · seed: 0-d int64 tensor (dropout keep-mask: kernels/_common._keep, the single-adapter op's mask of x
seen as (M, K), = fastlora.core.dropout.keep_mask; regenerated in backward, never stored).

Three kernels, each indexing the packed weight as W[off[k] + j, c] through (stride_wr, stride_wc), so one
kernel serves forward and backward by swapping strides:
  _shrink_kernel   out[m, j]  = σ_k·Σ_c in[m, c]·W[off_k + j, c]       fwd S = x·A_kᵀ;     bwd dS = s_k·dY·B_k
  _expand_kernel   out[m, c]  = σ_k·Σ_j in[m, j]·W[off_k + j, c] (+b)  fwd y = s_k·S·B_kᵀ + b; bwd dx = dS·A_k
  _grad_kernel     G[off_k + j, c] = σ_k·Σ_{ids[m]=k} L[m, j]·R[m, c]  bwd dB_k = s_k·Sᵀ·dY, dA_k = dSᵀ·drop(x)
Anchored, as the single-adapter op: the expand kernel WRITES every row of y (dx), base-only tokens included
(bias or 0), then cuBLAS accumulates the base GEMM in place: y.addmm_(x, W0ᵀ), dx.addmm_(dY, W0) (beta = 1).
The LoRA term is rounded once to x's dtype, then the base GEMM's fp32 sum is added and rounded (two roundings,
like PEFT).

Tiles come from the batch plan (fastlora/ops/multi_plan.py), built once per model forward on the device and shared
by every layer: "decode" = one tile per token, no sorting (BGMV-like); "grouped" = tiles of BLOCK_M tokens of
one adapter (SGMV-like), base-only tokens in tiles of their own. The gradient kernel reads the plan's
tokens-sorted-by-adapter segments. Ranks are looped per tile up to the tile's own r_k (rank blocks past r_k
do no work): heterogeneous ranks cost what they are, not r_max. Dropout: p per adapter, read from a (n, 2)
table of (p_k, 1/(1−p_k)) (PEFT's per-adapter lora_dropout, one launch for all of them).
The shrink and expand loops are the single-adapter op's tile bodies (kernels/_tiles.py) over gathered rows;
launch configs and dot precisions come from kernels/policy.py (kernels multi_shrink, multi_expand, multi_grad).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import policy
from ._common import _keep, _mma
from ._env import interpreting
from ._layout import weight_nk
from ._specs import SPEC_DTYPES, CompileSpec, cfg_name, shipped, specialize
from ._tiles import _expand_tile, _shrink_tile, _span

# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _tile(rows_ptr, tile_adapter_ptr, tile_lo_ptr, tile_hi_ptr, off_ptr, t, BLOCK_M: tl.constexpr):
    """Tile t -> (token rows (BLOCK_M,), row mask, adapter k (≥0 or −1), off_k, r_k (0 when k = −1))."""
    k = tl.load(tile_adapter_ptr + t)
    lo = tl.load(tile_lo_ptr + t)
    hi = tl.load(tile_hi_ptr + t)
    pos = lo + tl.arange(0, BLOCK_M)
    m_ok = pos < hi
    rows = tl.load(rows_ptr + pos, mask=m_ok, other=0)
    k_safe = tl.maximum(k, 0)
    off = tl.load(off_ptr + k_safe)
    rank = tl.where(k >= 0, tl.load(off_ptr + k_safe + 1) - off, 0)
    return rows, m_ok, k_safe, off, rank


@triton.jit
def _dropout(seed_ptr, p_ptr, k):
    """(seed, p_k, 1/(1−p_k)) of adapter k: p_ptr holds (p, 1/(1−p)) per adapter, float32 (n, 2)."""
    return tl.load(seed_ptr), tl.load(p_ptr + 2 * k), tl.load(p_ptr + 2 * k + 1)


@triton.jit
def _shrink_kernel(
    # pointers
    in_ptr, w_ptr, out_ptr, rows_ptr, tile_adapter_ptr, tile_lo_ptr, tile_hi_ptr, off_ptr, scale_ptr, seed_ptr, p_ptr,
    # sizes
    C,
    # strides
    stride_im, stride_ic,
    stride_wr, stride_wc,
    stride_om, stride_or,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[rows, j] = σ_k·Σ_c drop(in)[rows, c]·W[off_k + j, c], one rank block. Grid (r_max / BLOCK_R, tiles):
    the rank blocks of one tile are neighbours, so its x rows are re-read from L2, not HBM."""
    r0 = tl.program_id(0) * BLOCK_R
    t = tl.program_id(1)
    rows, m_ok, k, off, rank = _tile(rows_ptr, tile_adapter_ptr, tile_lo_ptr, tile_hi_ptr, off_ptr, t, BLOCK_M)
    rr = r0 + tl.arange(0, BLOCK_R)
    rc = tl.arange(0, BLOCK_C)
    r_ok = rr < rank
    rows64 = rows.to(tl.int64)
    in_ptrs = in_ptr + rows64[:, None] * stride_im + rc[None, :] * stride_ic
    # (BLOCK_C, BLOCK_R) tile of W_kᵀ
    w_ptrs = w_ptr + rc[:, None] * stride_wc + (off + rr).to(tl.int64)[None, :] * stride_wr
    seed, p, inv_keep = 0, 0.0, 1.0
    if HAS_DROPOUT:
        seed, p, inv_keep = _dropout(seed_ptr, p_ptr, k)
    c_end = tl.where(r0 < rank, C, 0)          # a rank block past r_k (or a base-only tile) does no work
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = _shrink_tile(acc, in_ptrs, w_ptrs, stride_ic, stride_wc, rows, m_ok, r_ok, c_end, C, seed, p,
                       HAS_DROPOUT, FP32_PRECISION, BLOCK_M, BLOCK_C)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k)
    out_ptrs = out_ptr + rows64[:, None] * stride_om + rr[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    # pointers
    in_ptr, w_ptr, out_ptr, bias_ptr, rows_ptr, tile_adapter_ptr, tile_lo_ptr, tile_hi_ptr, off_ptr, scale_ptr,
    seed_ptr, p_ptr,
    # sizes (dropout, when on, is applied to the product, column index c: the mask of x seen as (M, C))
    C,
    # strides
    stride_im, stride_ir,
    stride_wr, stride_wc,
    stride_om, stride_oc,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[rows, c] = (σ_k·in[rows, :r_k])·W[off_k : off_k + r_k, c] (⊙ keep/(1−p_k)) (+ bias[c]), written for every
    token of the tile (base-only tokens: bias or 0), so that cuBLAS then accumulates the base GEMM onto it
    (beta = 1). ACCUMULATE: out already holds the base GEMM (a grouped GEMM, which cannot accumulate: the MoE
    experts) and the term is added onto it in place, rounded once. Dropout (dx) and bias (y) are never on
    together. Grid (tiles, C / BLOCK_C)."""
    tl.static_assert(not (HAS_DROPOUT and HAS_BIAS))
    t = tl.program_id(0)
    rows, m_ok, k, off, rank = _tile(rows_ptr, tile_adapter_ptr, tile_lo_ptr, tile_hi_ptr, off_ptr, t, BLOCK_M)
    pid_c = tl.program_id(1)
    rc, c_ok = _span(pid_c, BLOCK_C, C)
    rows64 = rows.to(tl.int64)
    scale = tl.load(scale_ptr + k) if HAS_SCALE else 1.0
    # in[rows, :] and W_k = W[off_k:, cols]
    acc = _expand_tile(in_ptr, rows64 * stride_im, stride_ir, w_ptr + off.to(tl.int64) * stride_wr, rc * stride_wc,
                       stride_wr, m_ok, c_ok, rank, scale, bias_ptr + rc, tl.float32, HAS_SCALE, HAS_BIAS,
                       FP32_PRECISION, BLOCK_M, BLOCK_C, BLOCK_R)
    if HAS_DROPOUT:
        seed, p, inv_keep = _dropout(seed_ptr, p_ptr, k)
        acc = tl.where(_keep(seed, rows, pid_c * BLOCK_C, C, p, BLOCK_M, BLOCK_C), acc * inv_keep, 0.0)
    o_ptrs = out_ptr + rows64[:, None] * stride_om + rc[None, :] * stride_oc
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _grad_kernel(
    # pointers
    l_ptr, r_ptr, g_ptr, rows_ptr, bounds_ptr, off_ptr, scale_ptr, seed_ptr, p_ptr,
    # sizes (dropout, when on, is applied to R: the mask of x seen as (M, C))
    C,
    # strides
    stride_lm, stride_lr,
    stride_rm, stride_rc,
    stride_gr, stride_gc,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """G[off_k + j, c] = σ_k·Σ_{m in segment k} L[m, j]·drop(R)[m, c]. Grid (n, r_max / BLOCK_R, C / BLOCK_C).

    Rows are the tokens sorted by adapter; segment k is rows[bounds[k] : bounds[k+1]]. Every program
    writes its own block: no atomics, bitwise repeatable; an adapter absent from the batch gets zeros.
    """
    k = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    c0 = tl.program_id(2) * BLOCK_C
    off = tl.load(off_ptr + k)
    rank = tl.load(off_ptr + k + 1) - off
    lo = tl.load(bounds_ptr + k)
    hi = tl.where(r0 < rank, tl.load(bounds_ptr + k + 1), lo)
    rr = r0 + tl.arange(0, BLOCK_R)
    rc = c0 + tl.arange(0, BLOCK_C)
    rm = tl.arange(0, BLOCK_M)
    r_ok = rr < rank
    c_ok = rc < C
    if HAS_DROPOUT:
        seed, p, inv_keep = _dropout(seed_ptr, p_ptr, k)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        m_ok = (m0 + rm) < hi
        rows = tl.load(rows_ptr + m0 + rm, mask=m_ok, other=0)
        rows64 = rows.to(tl.int64)
        lt = tl.load(l_ptr + rr[:, None] * stride_lr + rows64[None, :] * stride_lm,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)          # (BLOCK_R, BLOCK_M) of Lᵀ
        rt = tl.load(r_ptr + rows64[:, None] * stride_rm + rc[None, :] * stride_rc,
                     mask=m_ok[:, None] & c_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_C)
        if HAS_DROPOUT:
            rt = tl.where(_keep(seed, rows, c0, C, p, BLOCK_M, BLOCK_C), rt, 0.0)
        acc = _mma(lt, rt, acc, FP32_PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k)
    g_ptrs = g_ptr + (off + rr).to(tl.int64)[:, None] * stride_gr + rc[None, :] * stride_gc
    tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------
# launchers (tensors in, tensors out). ``plan``: the batch plan (fastlora.ops.multi_plan.BatchPlan: rows,
# tile_adapter, tile_lo, tile_hi, sorted_rows, bounds, all int32 on the device, built once per model forward).
# ``pk``: float32 (n, 2) table of (p_k, 1/(1−p_k)), read only when ``dropout``.
# ---------------------------------------------------------------------------


def _tiles(plan, block_m):
    if block_m != plan.tile_m:
        raise ValueError(f"plan built for tiles of {plan.tile_m} tokens, the kernel uses BLOCK_M={block_m}")
    return plan.tile_adapter.numel()


def shrink(inp, w, w_strides, out, plan, off, scale, seed, pk, r_max, *, scaled, dropout):
    """out (M, r_max) fp32 = σ_k·drop(inp)·W_kᵀ per token; W[off_k + j, c] at j·w_strides[0] + c·w_strides[1]."""
    M, C = inp.shape
    prec = policy.lora_precision(inp.dtype, w.dtype)
    meta, opts = policy.launch_options(policy.config("multi_shrink", inp.dtype, prec, M, C, r_max, inp.device,
                                                     dropout=dropout))
    grid = (triton.cdiv(r_max, meta["BLOCK_R"]), _tiles(plan, meta["BLOCK_M"]))
    if grid[1] > 65535:
        raise ValueError(f"at most 65535 tiles per call ({plan.regime} plan of {inp.shape[0]} tokens has {grid[1]})")
    _shrink_kernel[grid](inp, w, out, plan.rows, plan.tile_adapter, plan.tile_lo, plan.tile_hi, off, scale, seed, pk,
                         C, inp.stride(0), inp.stride(1), w_strides[0], w_strides[1],
                         out.stride(0), out.stride(1), HAS_DROPOUT=dropout, HAS_SCALE=scaled,
                         FP32_PRECISION=prec, **meta, **opts)
    return out


def expand(inp, w, w_strides, out, bias, plan, off, scale, seed, pk, *, scaled, dropout, accumulate=False):
    """out (M, C) = σ_k·inp[:, :r_k]·W_k (⊙ keep/(1−p_k)) (+ bias) on every token (base-only: bias or 0);
    W[off_k + j, c] at j·w_strides[0] + c·w_strides[1]. ``accumulate``: out += that instead (one rounding)."""
    M, C = out.shape
    prec = policy.fp32_precision(out.dtype)
    # the "+drop" list (one stage) also serves ACCUMULATE: its epilogue holds a second tile too (2 stages spilled
    # 8 B on sm_80 for fp16 dx)
    meta, opts = policy.launch_options(policy.config("multi_expand", out.dtype, prec, M, C, inp.shape[1], out.device,
                                                     dropout=dropout or accumulate))
    grid = (_tiles(plan, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))
    _expand_kernel[grid](inp, w, out, bias if bias is not None else out, plan.rows, plan.tile_adapter, plan.tile_lo,
                         plan.tile_hi, off, scale, seed, pk, C, inp.stride(0), inp.stride(1), w_strides[0],
                         w_strides[1], out.stride(0), out.stride(1), HAS_DROPOUT=dropout, HAS_SCALE=scaled,
                         HAS_BIAS=bias is not None, ACCUMULATE=accumulate, FP32_PRECISION=prec, **meta, **opts)
    return out


def segment_grad(L, R, g, g_strides, plan, off, scale, seed, pk, r_max, *, scaled, dropout, base_dtype):
    """g[off_k + j, c] = σ_k·Σ_{ids[m]=k} L[m, j]·drop(R)[m, c]; g[row, c] at row·g_strides[0] + c·g_strides[1]."""
    n = off.numel() - 1
    M, C = R.shape
    prec = policy.lora_precision(base_dtype, g.dtype)
    meta, opts = policy.launch_options(policy.config("multi_grad", base_dtype, prec, M, C, r_max, R.device,
                                                     dropout=dropout))
    grid = (n, triton.cdiv(r_max, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))
    _grad_kernel[grid](L, R, g, plan.sorted_rows, plan.bounds, off, scale, seed, pk, C,
                       L.stride(0), L.stride(1), R.stride(0), R.stride(1), g_strides[0], g_strides[1],
                       HAS_DROPOUT=dropout, HAS_SCALE=scaled, FP32_PRECISION=prec, **meta, **opts)
    return g


def _scratch(shape, device, dtype=torch.float32, like=None):
    """An uninitialised buffer that the kernels fill wherever it is ever read (S, dS: j < r_k of each token's
    adapter; dA, dB: every row). Under the interpreter (the tests) it is filled with NaN instead, so that a
    kernel reading or returning an unwritten element shows up in every parity check."""
    t = torch.empty_like(like) if like is not None else torch.empty(shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if interpreting() else t


def multi_lora_fwd(x, weight, bias, lora_A, lora_B, off, scales, plan, r_max, pk, dropout, seed, fan_in_fan_out,
                   save_s):
    """Returns (y (..., N) in x's dtype, S (M, r_max) float32 — (0, r_max) when not ``save_s``).

    Anchored: the expand kernel writes bias + s_k·S·B_kᵀ into every row of y (base-only tokens: the bias), then
    cuBLAS accumulates y += x·W0ᵀ in place (beta = 1). r_max, n = off.numel() − 1 and M are host-known.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M, n = x2.shape[0], off.numel() - 1
    w = weight_nk(weight, fan_in_fan_out)                           # (N, K) view
    N = w.shape[0]
    S = _scratch((M if save_s else 0, r_max), x.device)
    if not (n and M and r_max):
        y = torch.addmm(bias.to(x2.dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        return y.reshape(*x.shape[:-1], N), S
    if not save_s:
        S = _scratch((M, r_max), x.device)
    shrink(x2, lora_A, (lora_A.stride(0), lora_A.stride(1)), S, plan, off, scales, seed, pk, r_max,
           scaled=False, dropout=dropout)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    expand(S, lora_B, (lora_B.stride(1), lora_B.stride(0)), y, None if bias is None else bias.to(x.dtype), plan,
           off, scales, seed, pk, scaled=True, dropout=False)
    y.addmm_(x2, w.t())
    return y.reshape(*x.shape[:-1], N), (S if save_s else S[:0])


def multi_lora_bwd(dy, x, weight, lora_A, lora_B, off, scales, plan, S, r_max, pk, dropout, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB):
    """Returns (dx (..., K) or None, dA (R_tot, K) or None, dB (N, R_tot) or None); S from the forward.

    dS = s_k·dY·B_k (M, r_max) · dB_k = s_k·dY_kᵀ·S_k · dA_k = dS_kᵀ·drop(x_k)
    dx = (dS·A_k) ⊙ keep/(1−p_k) written by the expand kernel, then cuBLAS dx += dY·W0 in place.
    """
    K = x.shape[-1]
    N = dy.shape[-1]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    M, n = x2.shape[0], off.numel() - 1
    w = weight_nk(weight, fan_in_fan_out).to(dy2.dtype)
    if not (n and M and r_max):
        return ((dy2 @ w).reshape(x.shape) if needs_dx else None), (torch.zeros_like(lora_A) if needs_dA else None), \
            (torch.zeros_like(lora_B) if needs_dB else None)
    # every row of dA / dB is written by the gradient kernel (zeros for adapters absent from the batch)
    dA = _scratch(lora_A.shape, x.device, lora_A.dtype, like=lora_A) if needs_dA else None
    dB = _scratch(lora_B.shape, x.device, lora_B.dtype, like=lora_B) if needs_dB else None
    dx = None
    if needs_dx or needs_dA:
        dS = _scratch((M, r_max), x.device)
        shrink(dy2, lora_B, (lora_B.stride(1), lora_B.stride(0)), dS, plan, off, scales, seed, pk, r_max,
               scaled=True, dropout=False)
        if needs_dx:
            dx = torch.empty((M, K), device=x.device, dtype=dy2.dtype)
            expand(dS, lora_A, (lora_A.stride(0), lora_A.stride(1)), dx, None, plan, off, scales, seed, pk,
                   scaled=False, dropout=dropout)
            dx.addmm_(dy2, w)
        if needs_dA:
            segment_grad(dS, x2, dA, (dA.stride(0), dA.stride(1)), plan, off, scales, seed, pk, r_max,
                         scaled=False, dropout=dropout, base_dtype=x.dtype)
    if needs_dB:
        segment_grad(S, dy2, dB, (dB.stride(1), dB.stride(0)), plan, off, scales, seed, pk, r_max,
                     scaled=True, dropout=False, base_dtype=x.dtype)
    return (dx.reshape(x.shape) if dx is not None else None), dA, dB


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect (compile for sm_80 / sm_90 without a GPU)
# ---------------------------------------------------------------------------

# (kernel, role, pointer dtypes ("x": base dtype, "a": adapter dtype), HAS_DROPOUT options, HAS_SCALE, HAS_BIAS
#  options (expand only), typical integer arguments: K = N = 4096, r_max = 64; = 1 becomes
#  constexpr as in a real launch; the bank stores B transposed, so B_k is read along unit-stride rows of Bᵀ).
#  Decode and grouped plans launch the same kernels with the same configs. Dtype pairs: _specs.SPEC_DTYPES.
_K, _RMAX = 4096, 64
_LAUNCHES = (
    ("shrink", "fwd S=x·Aᵀ", dict(in_ptr="x", w_ptr="a", out_ptr="fp32"), (False, True), False, (None,),
     dict(C=_K, stride_im=_K, stride_ic=1, stride_wr=_K, stride_wc=1, stride_om=_RMAX, stride_or=1)),
    ("shrink", "bwd dS=s·dY·B", dict(in_ptr="x", w_ptr="a", out_ptr="fp32"), (False,), True, (None,),
     dict(C=_K, stride_im=_K, stride_ic=1, stride_wr=_K, stride_wc=1, stride_om=_RMAX, stride_or=1)),
    ("expand", "fwd y=s·S·Bᵀ+b", dict(in_ptr="fp32", w_ptr="a", out_ptr="x", bias_ptr="x"), (False,), True,
     (False, True), dict(C=_K, stride_im=_RMAX, stride_ir=1, stride_wr=_K, stride_wc=1, stride_om=_K, stride_oc=1)),
    ("expand", "bwd dx=dS·A", dict(in_ptr="fp32", w_ptr="a", out_ptr="x", bias_ptr="x"), (False, True), False,
     (False,), dict(C=_K, stride_im=_RMAX, stride_ir=1, stride_wr=_K, stride_wc=1, stride_om=_K, stride_oc=1)),
    ("grad", "bwd dB=s·dYᵀ·S", dict(l_ptr="fp32", r_ptr="x", g_ptr="a"), (False,), True, (None,),
     dict(C=_K, stride_lm=_RMAX, stride_lr=1, stride_rm=_K, stride_rc=1, stride_gr=_K, stride_gc=1)),
    ("grad", "bwd dA=dSᵀ·x", dict(l_ptr="fp32", r_ptr="x", g_ptr="a"), (False, True), False, (None,),
     dict(C=_K, stride_lm=_RMAX, stride_lr=1, stride_rm=_K, stride_rc=1, stride_gr=_K, stride_gc=1)),
)
_INDEX_PTRS = ("rows_ptr", "tile_adapter_ptr", "tile_lo_ptr", "tile_hi_ptr", "off_ptr", "bounds_ptr")


def compile_specs():
    """Every (kernel, dtype pair, dropout, scale, bias, accumulate) combination the launchers use, as a CompileSpec."""
    fns = {"shrink": _shrink_kernel, "expand": _expand_kernel, "grad": _grad_kernel}
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for kname, role, ptrs, drops, scaled, biases, values in _LAUNCHES:
            # shrink (S, dS) and grad (dA, dB) feed adapter gradients (lora_precision: tf32x3 for fp32 adapters
            # on a half base); expand (y, dx) is rounded to the base dtype (fp32_precision)
            kprec = prec if kname == "expand" else lprec
            fn = fns[kname]
            # expand also with ACCUMULATE (MoE experts: y / dx += the LoRA term onto the grouped GEMM's output)
            accums = (False, True) if kname == "expand" else (None,)
            for drop, accum in [(d, a) for d in drops for a in accums]:
                for cfg in shipped(f"multi_{kname}", xdt, kprec, drop or bool(accum)):
                    meta, opts = policy.launch_options(cfg)
                    meta.update(HAS_DROPOUT=drop, HAS_SCALE=scaled, FP32_PRECISION=kprec)
                    for has_bias in [b for b in biases if not (accum and b)]:
                        if has_bias is not None:
                            meta["HAS_BIAS"] = has_bias
                        if accum is not None:
                            meta["ACCUMULATE"] = accum
                        pointers = {a: {"x": xdt, "a": adt}.get(v, v) for a, v in ptrs.items()}
                        pointers.update({n: "i32" for n in _INDEX_PTRS}, scale_ptr="fp32", seed_ptr="i64",
                                        p_ptr="fp32")
                        sig, consts, attrs = specialize(fn, meta, pointers, values)
                        flags = ("" if has_bias is None else f" bias={int(has_bias)}") + (" acc=1" if accum else "")
                        specs.append(CompileSpec(
                            f"multi_lora_{kname}[{role}] x={xdt} ab={adt}/{kprec} drop={int(drop)}{flags} "
                            f"{cfg_name(cfg)}", fn, sig, consts, opts["num_warps"], opts["num_stages"], attrs=attrs))
    return specs


__all__ = ["multi_lora_fwd", "multi_lora_bwd", "shrink", "expand", "segment_grad", "compile_specs"]
