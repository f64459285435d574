"""LoRA linear, backward — the anchored plan: Triton does the low-rank passes, cuBLAS the dY·W0 GEMM.

Given dY (M, N) and what forward saved — x (M, K), S = dropout(x)·Aᵀ (M, r) fp32, the seed and the scale s:

    dS    = s · dY·B                  (M, r)   _lora_bwd_dsdb_kernel: ONE pass over dY gives dS (computed once),
    dB    = s · dYᵀ·S                 (N, r)                          dB and dbias
    dbias = Σ_m dY                    (N,)
    dx    = (dS·A) ⊙ keep / (1 − p)   (M, K)   _lora_bwd_dx_kernel: per tile of x, writes the LoRA term into dx
    dA    = dSᵀ·(x ⊙ keep) / (1 − p)  (r, K)                        and adds its share of dA (mask regenerated)
    dx   += dY·W0                              cuBLAS addmm_ with beta = 1

Shapes: W0 (N, K), or (K, N) for fan_in_fan_out (a transposed view for cuBLAS) · A (r, K) · B (N, r).
Reductions over M (dB, dbias, dA) go through fp32 atomics (default) or, in deterministic mode, into per-row-tile
partial buffers summed by torch afterwards: no atomics, bitwise repeatable. dS may be split over N to fill the GPU;
its partials (SPLIT_N, M, r) are summed the same way.
Rounding: dx = round(round((dS·A)⊙keep/(1−p)) + dY·W0), two roundings like PEFT; dS, dA, dB stay fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import policy
from ._common import _keep, _mma
from ._specs import SPEC_DTYPES, CompileSpec, cfg_name, shipped, specialize
from ._tiles import _span
from ._layout import weight_nk
from .linear_fwd import SPEC_K, SPEC_M, SPEC_N, SPEC_R


@triton.jit
def _lora_bwd_dsdb_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, dbias_ptr, scale_ptr,
    # sizes
    M, N, R, N_PER_SPLIT,
    # strides
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dss, stride_dsm, stride_dsr,          # dS partials (SPLIT_N, M, R)
    stride_dbt, stride_dbn, stride_dbr,          # dB (N, R), or partials (M tiles, N, R): stride_dbt = 0 if ATOMIC
    stride_dbiast,                               # dbias (N,), or partials (M tiles, N)
    # meta-parameters
    COMPUTE_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, ATOMIC: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (M / BLOCK_M, SPLIT_N, R / BLOCK_R). One pass over dY[rows, this split's columns]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    rm, m_ok = _span(pid_m, BLOCK_M, M)
    rr, r_ok = _span(pid_r, BLOCK_R, R)
    ACC = ds_ptr.dtype.element_ty                                               # fp32 (fp64 for fp64 inputs)
    scale = tl.load(scale_ptr).to(ACC)

    if COMPUTE_DB:
        s_tile = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_R) fp32
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(n_start + N_PER_SPLIT, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_end
        dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)             # (BLOCK_M, BLOCK_N)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)              # (BLOCK_N, BLOCK_R)
        ds = _mma(dy, b, ds, FP32_PRECISION)
        if COMPUTE_DB:
            db = _mma(tl.trans(dy), s_tile, tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC), FP32_PRECISION)
            db_ptrs = db_ptr + pid_m * stride_dbt + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr
            if ATOMIC:
                tl.atomic_add(db_ptrs, db * scale, mask=n_ok[:, None] & r_ok[None, :])
            else:
                tl.store(db_ptrs, db * scale, mask=n_ok[:, None] & r_ok[None, :])
        if HAS_DBIAS:
            if pid_r == 0:
                colsum = tl.sum(dy.to(ACC), axis=0)
                dbias_ptrs = dbias_ptr + pid_m * stride_dbiast + rn
                if ATOMIC:
                    tl.atomic_add(dbias_ptrs, colsum, mask=n_ok)
                else:
                    tl.store(dbias_ptrs, colsum, mask=n_ok)

    ds_ptrs = ds_ptr + pid_s * stride_dss + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr
    tl.store(ds_ptrs, ds * scale, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_bwd_dx_kernel(
    # pointers
    a_ptr, ds_ptr, x_ptr, dx_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, R,
    # dropout
    p, inv_keep,
    # strides
    stride_ar, stride_ak,
    stride_dsm, stride_dsr,
    stride_xm, stride_xk,
    stride_dxm, stride_dxk,
    stride_dat, stride_dar, stride_dak,          # dA (R, K), or partials (M tiles, R, K): stride_dat = 0 if ATOMIC
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, ATOMIC: tl.constexpr,
    FP32_PRECISION: tl.constexpr, DA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx tile (BLOCK_M, BLOCK_K) = (dS·A)⊙keep/(1−p) in dx's dtype, and this row tile's share of dA[:, cols];
    the rank is walked in chunks of BLOCK_R. Grid (M / BLOCK_M, K / BLOCK_K)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm, m_ok = _span(pid_m, BLOCK_M, M)
    rk, k_ok = _span(pid_k, BLOCK_K, K)
    rr = tl.arange(0, BLOCK_R)

    ACC = ds_ptr.dtype.element_ty                                               # fp32 (fp64 for fp64 inputs)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), rm, pid_k * BLOCK_K, K, p, BLOCK_M, BLOCK_K)
    if COMPUTE_DA:
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x, 0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rc_ok = (r0 + rr) < R
        ds = tl.load(ds_ptr + rm[:, None] * stride_dsm + (r0 + rr)[None, :] * stride_dsr,
                     mask=m_ok[:, None] & rc_ok[None, :], other=0.0)            # (BLOCK_M, BLOCK_R)
        if COMPUTE_DX:
            a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=rc_ok[:, None] & k_ok[None, :], other=0.0)         # (BLOCK_R, BLOCK_K)
            acc = _mma(ds, a, acc, FP32_PRECISION)
        if COMPUTE_DA:
            da = _mma(tl.trans(ds), x, tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC), DA_PRECISION)
            da_ptrs = da_ptr + pid_m * stride_dat + (r0 + rr)[:, None] * stride_dar + rk[None, :] * stride_dak
            if ATOMIC:
                tl.atomic_add(da_ptrs, da * inv_keep, mask=rc_ok[:, None] & k_ok[None, :])
            else:
                tl.store(da_ptrs, da * inv_keep, mask=rc_ok[:, None] & k_ok[None, :])

    if COMPUTE_DX:
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * inv_keep, 0.0)
        dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------


def _split_n(M: int, N: int, R: int, BM: int, BR: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT_N, N_PER_SPLIT): split dY's columns so the dS/dB pass has at least ~2 programs per SM.
    N_PER_SPLIT is a multiple of 256 (whole column tiles); any value is correct."""
    _, sms = policy.device_info(device)
    if sms is None:
        return 1, max(N, 1)
    programs = triton.cdiv(M, BM) * triton.cdiv(R, BR)
    split = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(N, 256)))
    per = triton.cdiv(triton.cdiv(N, split), 256) * 256
    return triton.cdiv(N, per), per


def lora_bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
             needs_dx, needs_dA, needs_dB, needs_dbias, deterministic, split_n=None):
    """Returns (dx, dA, dB, dbias) — None where not needed. dbias is fp32 (fp64 for fp64 x).
    ``split_n`` forces the column split of the dS/dB pass (tests use it on CPU, where it is 1)."""
    w = weight_nk(weight, fan_in_fan_out)
    N, K = w.shape
    R = lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dev = x.device
    if M == 0:
        return (torch.zeros_like(x) if needs_dx else None, torch.zeros_like(lora_A) if needs_dA else None,
                torch.zeros_like(lora_B) if needs_dB else None,
                torch.zeros(N, device=dev, dtype=policy.acc_dtype(x.dtype)) if needs_dbias else None)
    dy2 = dy.reshape(M, N)
    prec = policy.fp32_precision(x.dtype)
    lprec = policy.lora_precision(x.dtype, lora_A.dtype)     # dS, dB, dA
    atomic = not deterministic
    alloc = torch.zeros if atomic else torch.empty
    f32 = dict(device=dev, dtype=policy.acc_dtype(x.dtype))
    unused = torch.empty(0, **f32)            # pointer for outputs not asked for (never written)

    # 1) dS (always: dx and dA need it), dB, dbias — one pass over dY
    meta, opts = policy.launch_options(policy.config("dsdb", x.dtype, lprec, M, N, R, dev))
    BM, BR = meta["BLOCK_M"], policy.block_r(R, lprec)
    if split_n is None:
        split, per = _split_n(M, N, R, BM, BR, dev)
    else:
        per = triton.cdiv(N, split_n)
        split = triton.cdiv(N, per)
    m_tiles = triton.cdiv(M, BM)
    ds_part = torch.empty((split, M, R), **f32)
    db = alloc((N, R) if atomic else (m_tiles, N, R), **f32) if needs_dB else unused
    dbias = alloc((N,) if atomic else (m_tiles, N), **f32) if needs_dbias else unused
    db3 = ((0, *db.stride()) if atomic else db.stride()) if needs_dB else (0, 0, 0)
    dbias_t = (0 if atomic else dbias.stride(0)) if needs_dbias else 0
    _lora_bwd_dsdb_kernel[(m_tiles, split, triton.cdiv(R, BR))](
        dy2, lora_B, S, ds_part, db, dbias, scale, M, N, R, per,
        dy2.stride(0), dy2.stride(1), lora_B.stride(0), lora_B.stride(1),
        S.stride(0) if needs_dB else 0, S.stride(1) if needs_dB else 0,
        *ds_part.stride(), *db3, dbias_t,
        COMPUTE_DB=needs_dB, HAS_DBIAS=needs_dbias, ATOMIC=atomic, FP32_PRECISION=lprec, BLOCK_R=BR,
        **meta, **opts)
    ds = ds_part[0] if split == 1 else ds_part.sum(0)
    dB = (db if atomic else db.sum(0)).to(lora_B.dtype) if needs_dB else None
    dbias = (dbias if atomic else dbias.sum(0)) if needs_dbias else None

    # 2) the LoRA term of dx (written into dx) and dA, on the tiles of x; 3) cuBLAS adds dY·W0 onto dx
    dx = dA = None
    if needs_dx or needs_dA:
        p = float(dropout_p)
        meta, opts = policy.launch_options(policy.config("dx", x.dtype, lprec, M, K, R, dev, dropout=p > 0))
        m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        dx = torch.empty((M, K), device=dev, dtype=x.dtype) if needs_dx else None
        da = alloc((R, K) if atomic else (m_tiles, R, K), **f32) if needs_dA else unused
        da3 = ((0, *da.stride()) if atomic else da.stride()) if needs_dA else (0, 0, 0)
        _lora_bwd_dx_kernel[(m_tiles, triton.cdiv(K, meta["BLOCK_K"]))](
            lora_A, ds, x2, dx if needs_dx else unused, da, seed, M, K, R, p, 1.0 / (1.0 - p),
            lora_A.stride(0), lora_A.stride(1), ds.stride(0), ds.stride(1), x2.stride(0), x2.stride(1),
            dx.stride(0) if needs_dx else 0, dx.stride(1) if needs_dx else 0, *da3,
            HAS_DROPOUT=p > 0, COMPUTE_DX=needs_dx, COMPUTE_DA=needs_dA, ATOMIC=atomic,
            FP32_PRECISION=prec, DA_PRECISION=lprec, BLOCK_R=policy.CHUNK_R, **meta, **opts)
        if needs_dx:
            if w.dtype != dx.dtype:            # a half W0 under fp32 x (fastlora.ops.qlora): dY·W0 in W0's dtype
                dx.add_(dy2.to(w.dtype) @ w)
            else:
                dx.addmm_(dy2, w)              # cuBLAS: dx = dx0 + dY·W0 (beta = 1)
            dx = dx.reshape(x.shape)
        dA = (da if atomic else da.sum(0)).to(lora_A.dtype) if needs_dA else None
    return dx, dA, dB, dbias


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect
# ---------------------------------------------------------------------------


def compile_specs():
    M, N, K, R = SPEC_M, SPEC_N, SPEC_K, SPEC_R
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for atomic in (True, False):
            values = dict(M=M, N=N, K=K, R=R, N_PER_SPLIT=N, stride_dym=N, stride_dyn=1,
                          stride_bn=R, stride_br=1, stride_sm=R, stride_sr=1, stride_dss=M * R, stride_dsm=R,
                          stride_dsr=1, stride_dbt=0 if atomic else N * R, stride_dbn=R, stride_dbr=1,
                          stride_dbiast=0 if atomic else N, stride_ar=K, stride_ak=1,
                          stride_xm=K, stride_xk=1, stride_dxm=K, stride_dxk=1,
                          stride_dat=0 if atomic else R * K, stride_dar=K, stride_dak=1)
            for cfg in shipped("dsdb", xdt, lprec):
                meta, opts = policy.launch_options(cfg)
                meta.update(COMPUTE_DB=True, HAS_DBIAS=True, ATOMIC=atomic, FP32_PRECISION=lprec,
                            BLOCK_R=policy.block_r(R, lprec))
                sig, consts, attrs = specialize(_lora_bwd_dsdb_kernel, meta, {
                    "dy_ptr": xdt, "b_ptr": adt, "s_ptr": "fp32", "ds_ptr": "fp32", "db_ptr": "fp32",
                    "dbias_ptr": "fp32", "scale_ptr": "fp32"}, values)
                specs.append(CompileSpec(
                    f"lora_bwd_dsdb x={xdt} ab={adt}/{lprec} atomic={int(atomic)} {cfg_name(cfg)} r{meta['BLOCK_R']}",
                    _lora_bwd_dsdb_kernel, sig, consts, opts["num_warps"], opts["num_stages"], attrs=attrs))
            for drop in (False, True):
                for cfg in shipped("dx", xdt, lprec, drop):
                    meta, opts = policy.launch_options(cfg)
                    meta.update(HAS_DROPOUT=drop, COMPUTE_DX=True, COMPUTE_DA=True, ATOMIC=atomic,
                                FP32_PRECISION=prec, DA_PRECISION=lprec, BLOCK_R=policy.CHUNK_R)
                    sig, consts, attrs = specialize(_lora_bwd_dx_kernel, meta, {
                        "a_ptr": adt, "ds_ptr": "fp32", "x_ptr": xdt, "dx_ptr": xdt, "da_ptr": "fp32",
                        "seed_ptr": "i64"}, values, floats=("p", "inv_keep"))
                    specs.append(CompileSpec(
                        f"lora_bwd_dx x={xdt} ab={adt}/{prec}{'+' + lprec if lprec != prec else ''} "
                        f"atomic={int(atomic)} drop={int(drop)} {cfg_name(cfg)} r{policy.CHUNK_R}",
                        _lora_bwd_dx_kernel, sig, consts, opts["num_warps"], opts["num_stages"], attrs=attrs))
    return specs


__all__ = ["lora_bwd", "compile_specs"]
