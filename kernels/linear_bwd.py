"""Fused LoRA linear, backward.

Given dY (M, N) and what forward saved — x (M, K) through strides, S = dropout(x)·Aᵀ (M, r) float32,
the seed and the scale s — compute

    dS    = s · dY·B              (M, r)      kernel 1, one pass over dY, computed ONCE
    dB    = s · dYᵀ·S             (N, r)      kernel 1, same pass
    dbias = Σ_m dY                (N,)        kernel 1, same pass
    dx    = dY·W + (dS·A) ⊙ keep / (1 − p)    kernel 2: the LoRA term seeds the GEMM's accumulator
    dA    = dSᵀ·(x ⊙ keep) / (1 − p)  (r, K)  kernel 2, on the same (M, K) tiles, mask regenerated

Shapes: W (N, K), or (K, N) for fan_in_fan_out (strides, no copy) · A (r, K) · B (N, r).
Reductions over M (dB, dbias, dA) either go through fp32 atomics (default) or, in deterministic
mode, into per-row-tile partial buffers summed by torch afterwards: no atomics, bitwise repeatable.
dS is split over N only to fill the GPU; its partials (SPLIT_N, M, r) are summed the same way.
Without dropout a second variant, "split", runs dx on the forward's GEMM kernel (dY·W0ᵀ with dS·A in its
epilogue, through strides) and kernel 2 for dA only; on a GPU the faster is kept per shape.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (GEMM_BLOCK_R, _grouped_tile, _keep, _mma, _x_row_offsets, acc_dtype, block_r,
                      fp32_precision, interpreting, lora_precision, m_bucket, union, wants_fp32_tiles, x_as_3d)
from ._specs import CompileSpec, specialize
from .linear_fwd import gemm_lowrank

# Row-tile heights are fixed per kernel (not tuned): the deterministic partial buffers are sized by them.
# (128-row dx tiles, tried after an H200 run showed this kernel at 2.4x cuBLAS's same-size GEMM, spill on
# sm_80, and on sm_90 with dropout or tf32x3: python -m fastlora.inspect, 2026-11-26.)
DSDB_BLOCK_M = 16 if interpreting() else 64
DX_BLOCK_M = 16 if interpreting() else 64


# Every config below compiles for sm_80 and sm_90 with zero spill bytes under every flag combination
# (python -m fastlora.inspect); fp32 inputs (FMA dots, no tensor cores at "ieee") need narrower tiles.


def _dsdb_configs(fp32: bool = False):
    if interpreting():
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if fp32:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=s) for s in (2, 3)]
    return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=s) for s in (3, 4)]


def _dx_configs(fp32: bool = False):
    if interpreting():
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    cfg = lambda bk, bn, w, s: triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)  # noqa: E731
    if fp32:
        return [cfg(32, 32, 4, 3), cfg(32, 16, 4, 3), cfg(64, 32, 8, 2)]
    return [cfg(64, 64, 4, 4), cfg(128, 64, 8, 3)]


def _prune_by_dtype(configs_of, pointer):
    """early_config_prune: keep the tile list of the dtype / precision tier (fp32 tiles for tf32x3)."""
    def prune(configs, named_args, **kwargs):
        keep = {str(c) for c in configs_of(wants_fp32_tiles(named_args, pointer, kwargs))}
        return [c for c in configs if str(c) in keep] or configs
    return prune


@triton.jit
def _lora_bwd_dsdb_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, dbias_ptr, scale_ptr,
    # sizes
    M, N, R, N_PER_SPLIT, M_BUCKET,
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
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
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
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
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
    dy_ptr, w_ptr, a_ptr, ds_ptr, x_ptr, dx_ptr, da_ptr, seed_ptr,
    # sizes
    M, N, K, R, T, M_BUCKET,
    # dropout
    p, inv_keep,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_dsm, stride_dsr,
    stride_xb, stride_xt, stride_xk,
    stride_dxm, stride_dxk,
    stride_dat, stride_dar, stride_dak,          # dA (R, K), or partials (M tiles, R, K): stride_dat = 0 if ATOMIC
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, ATOMIC: tl.constexpr,
    FP32_PRECISION: tl.constexpr, DA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx tile (BLOCK_M, BLOCK_K) and this row tile's share of dA[:, cols]. Grid: tiles of x."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    k_ok = rk < K

    ACC = ds_ptr.dtype.element_ty                                               # fp32 (fp64 for fp64 inputs)
    # 1) LoRA part first, so its temporaries are dead before the main loop's accumulator grows:
    #    acc = (dS·A) ⊙ keep / (1 − p); dA share = dSᵀ·(x ⊙ keep) / (1 − p)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), rm, pid_k * BLOCK_K, K, p, BLOCK_M, BLOCK_K)
    if COMPUTE_DA:
        x = tl.load(x_ptr + _x_row_offsets(rm, T, stride_xb, stride_xt)[:, None] + rk[None, :] * stride_xk,
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
        # 2) base GEMM dY·W on top
        dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk      # (BLOCK_N, BLOCK_K) of W
        for n0 in range(0, N, BLOCK_N):
            n_ok = (n0 + rn) < N
            dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mma(dy, w, acc, FP32_PRECISION)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
        dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


_dsdb = triton.autotune(configs=union(_dsdb_configs(False), _dsdb_configs(True)),
                        key=["M_BUCKET", "N", "BLOCK_R", "ATOMIC", "FP32_PRECISION"],
                        reset_to_zero=["db_ptr", "dbias_ptr"],
                        prune_configs_by={"early_config_prune": _prune_by_dtype(_dsdb_configs, "dy_ptr")},
                        )(_lora_bwd_dsdb_kernel)
_dx = triton.autotune(configs=union(_dx_configs(False), _dx_configs(True)),
                      key=["M_BUCKET", "N", "K", "COMPUTE_DX", "COMPUTE_DA", "HAS_DROPOUT", "ATOMIC"],
                      reset_to_zero=["da_ptr"],
                      prune_configs_by={"early_config_prune": _prune_by_dtype(_dx_configs, "dy_ptr")},
                      )(_lora_bwd_dx_kernel)


def _split_n(M: int, N: int, R: int, BR: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT_N, N_PER_SPLIT): split dY's columns so kernel 1 has ~2 programs per SM.
    N_PER_SPLIT is a multiple of 256 (whole BLOCK_N tiles, aligned loads); any value is correct."""
    if device.type != "cuda":
        return 1, max(N, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(M, DSDB_BLOCK_M) * triton.cdiv(R, BR)
    split = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(N, 256)))
    per = triton.cdiv(triton.cdiv(N, split), 256) * 256
    return triton.cdiv(N, per), per


def lora_bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
             needs_dx, needs_dA, needs_dB, needs_dbias, deterministic, split_n=None):
    """Returns (dx, dA, dB, dbias) — None where not needed. dbias is float32 (float64 for float64 x).
    ``split_n`` overrides the column split of kernel 1 (tests use it on CPU)."""
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    R, K = lora_A.shape
    x3, M, T, sxb, sxt, sxk = x_as_3d(x)
    dev = x.device
    if M == 0:
        return (torch.zeros_like(x) if needs_dx else None, torch.zeros_like(lora_A) if needs_dA else None,
                torch.zeros_like(lora_B) if needs_dB else None,
                torch.zeros(N, device=dev, dtype=acc_dtype(x.dtype)) if needs_dbias else None)
    dy2 = dy.reshape(M, N)
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if fan_in_fan_out else weight.stride()
    prec = fp32_precision(x.dtype)
    lprec = lora_precision(x.dtype, lora_A.dtype)     # dS, dB, dA: see lora_precision
    BR = block_r(R, lprec)
    atomic = not deterministic
    alloc = torch.zeros if atomic else torch.empty
    f32 = dict(device=dev, dtype=acc_dtype(x.dtype))   # fp32 (fp64 for fp64 inputs)
    unused = torch.empty(1, **f32)   # pointer for outputs not asked for (never written)

    # kernel 1: dS (always: dx and dA need it), dB, dbias
    if split_n is None:
        split, per = _split_n(M, N, R, BR, dev)
    else:
        per = triton.cdiv(N, split_n)
        split = triton.cdiv(N, per)
    m_tiles = triton.cdiv(M, DSDB_BLOCK_M)
    ds_part = torch.empty((split, M, R), **f32)
    db = alloc((N, R) if atomic else (m_tiles, N, R), **f32) if needs_dB else unused
    dbias = alloc((N,) if atomic else (m_tiles, N), **f32) if needs_dbias else unused
    db3 = (0, *db.stride()) if (needs_dB and atomic) else (db.stride() if needs_dB else (0, 0, 0))
    dbias_t = (0 if atomic else dbias.stride(0)) if needs_dbias else 0
    _dsdb[(m_tiles, split, triton.cdiv(R, BR))](
        dy2, lora_B, S, ds_part, db, dbias, scale, M, N, R, per, m_bucket(M),
        dy2.stride(0), dy2.stride(1), lora_B.stride(0), lora_B.stride(1),
        S.stride(0) if S.numel() else 0, S.stride(1) if S.numel() else 0,
        *ds_part.stride(), *db3, dbias_t,
        COMPUTE_DB=needs_dB, HAS_DBIAS=needs_dbias, ATOMIC=atomic, FP32_PRECISION=lprec,
        BLOCK_M=DSDB_BLOCK_M, BLOCK_R=BR)
    ds = ds_part[0] if split == 1 else ds_part.sum(0)
    dB = (db if atomic else db.sum(0)).to(lora_B.dtype) if needs_dB else None
    dbias = (dbias if atomic else dbias.sum(0)) if needs_dbias else None

    # kernel 2: dx and dA on the tiles of x ("fused"), or dx on the forward's GEMM + a dA pass ("split")
    p = float(dropout_p)

    def dx_da(variant):
        split_dx = variant == "split" and needs_dx
        dx = torch.empty((M, K), device=dev, dtype=x.dtype) if needs_dx and not split_dx else unused
        da = (alloc((R, K) if atomic else (triton.cdiv(M, DX_BLOCK_M), R, K), **f32)) if needs_dA else unused
        da3 = ((0, *da.stride()) if atomic else da.stride()) if needs_dA else (0, 0, 0)
        if needs_dA or not split_dx:
            grid = lambda meta: (triton.cdiv(M, DX_BLOCK_M) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
            _dx[grid](
                dy2, weight, lora_A, ds, x3, dx, da, seed, M, N, K, R, T, m_bucket(M), p, 1.0 / (1.0 - p),
                dy2.stride(0), dy2.stride(1), stride_wn, stride_wk, lora_A.stride(0), lora_A.stride(1),
                ds.stride(0), ds.stride(1), sxb, sxt, sxk,
                dx.stride(0) if needs_dx and not split_dx else 0, dx.stride(1) if needs_dx and not split_dx else 0,
                *da3, HAS_DROPOUT=p > 0, COMPUTE_DX=needs_dx and not split_dx, COMPUTE_DA=needs_dA, ATOMIC=atomic,
                FP32_PRECISION=prec, DA_PRECISION=lprec, BLOCK_M=DX_BLOCK_M, BLOCK_R=GEMM_BLOCK_R)
        if split_dx:     # dx[m, c] = Σ_j dY[m, j]·W[j, c] + Σ_j dS[m, j]·A[j, c]: W0ᵀ and Aᵀ through strides
            dx = gemm_lowrank(dy2, (weight, stride_wk, stride_wn), K, ds,
                              (lora_A, lora_A.stride(1), lora_A.stride(0)))
        dA = (da if atomic else da.sum(0)).to(lora_A.dtype) if needs_dA else None
        return (dx.reshape(x.shape) if needs_dx else None), dA

    dx = dA = None
    if needs_dx or needs_dA:
        key = (m_bucket(M), N, K, R, x.dtype, lora_A.dtype, needs_dA, atomic)
        dx, dA = dx_da(_choose_bwd_variant(dx_da, key, p, needs_dx, x.is_cuda and not interpreting()))
    return dx, dA, dB, dbias


BWD_VARIANTS = ("fused", "split")
_bwd_variant_cache: dict = {}


def _choose_bwd_variant(run, key, p: float, needs_dx: bool, on_gpu: bool) -> str:
    """"fused": one kernel for dx (LoRA term first, then dY·W) and dA. "split": dx on the forward's two-launch
    GEMM (dY·W0ᵀ with dS·A in its epilogue; its large tiles) plus a dA-only pass of the dx kernel — only
    without dropout (the GEMM epilogue does not mask). On a GPU both are timed once per shape key (an H200 run
    had the fused dx kernel at 435 µs where the forward GEMM of the same size took 283 µs); off the GPU,
    fused. FASTLORA_BWD_VARIANT pins one where it applies."""
    pinned = os.environ.get("FASTLORA_BWD_VARIANT", "auto")
    if pinned not in ("auto",) + BWD_VARIANTS:
        raise ValueError(f"FASTLORA_BWD_VARIANT must be 'auto', 'fused' or 'split', got {pinned!r}")
    if p > 0 or not needs_dx:
        return "fused"
    if pinned != "auto":
        return pinned
    if not on_gpu:
        return "fused"
    if key not in _bwd_variant_cache:
        ms = {v: triton.testing.do_bench(lambda v=v: run(v)) for v in BWD_VARIANTS}
        _bwd_variant_cache[key] = min(ms, key=ms.get)
    return _bwd_variant_cache[key]


def compile_specs():
    from .linear_fwd import SPEC_DTYPES, SPEC_K, SPEC_M, SPEC_N, SPEC_R
    M, N, K, R = SPEC_M, SPEC_N, SPEC_K, SPEC_R
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for atomic in (True, False):
            values = dict(M=M, N=N, K=K, R=R, T=M, M_BUCKET=M, N_PER_SPLIT=N, stride_dym=N, stride_dyn=1,
                          stride_bn=R, stride_br=1, stride_sm=R, stride_sr=1, stride_dss=M * R, stride_dsm=R,
                          stride_dsr=1, stride_dbt=0 if atomic else N * R, stride_dbn=R, stride_dbr=1,
                          stride_dbiast=0 if atomic else N, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1,
                          stride_xb=0, stride_xt=K, stride_xk=1, stride_dxm=K, stride_dxk=1,
                          stride_dat=0 if atomic else R * K, stride_dar=K, stride_dak=1)
            for cfg in _dsdb_configs(xdt == "fp32" or lprec == "tf32x3"):
                meta = dict(cfg.kwargs, COMPUTE_DB=True, HAS_DBIAS=True, ATOMIC=atomic, FP32_PRECISION=lprec,
                            BLOCK_M=DSDB_BLOCK_M, BLOCK_R=block_r(R, lprec))
                sig, consts, attrs = specialize(_lora_bwd_dsdb_kernel, meta, {
                    "dy_ptr": xdt, "b_ptr": adt, "s_ptr": "fp32", "ds_ptr": "fp32", "db_ptr": "fp32",
                    "dbias_ptr": "fp32", "scale_ptr": "fp32"}, values)
                specs.append(CompileSpec(
                    f"lora_bwd_dsdb x={xdt} ab={adt}/{lprec} atomic={int(atomic)} {DSDB_BLOCK_M}x{cfg.kwargs['BLOCK_N']} "
                    f"r{meta['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}",
                    _lora_bwd_dsdb_kernel, sig, consts, cfg.num_warps, cfg.num_stages, attrs=attrs))
            for drop in (False, True):
                for cfg in _dx_configs(xdt == "fp32"):
                    meta = dict(cfg.kwargs, HAS_DROPOUT=drop, COMPUTE_DX=True, COMPUTE_DA=True, ATOMIC=atomic,
                                FP32_PRECISION=prec, DA_PRECISION=lprec, BLOCK_M=DX_BLOCK_M, BLOCK_R=GEMM_BLOCK_R)
                    sig, consts, attrs = specialize(_lora_bwd_dx_kernel, meta, {
                        "dy_ptr": xdt, "w_ptr": xdt, "a_ptr": adt, "ds_ptr": "fp32", "x_ptr": xdt,
                        "dx_ptr": xdt, "da_ptr": "fp32", "seed_ptr": "i64"}, values, floats=("p", "inv_keep"))
                    specs.append(CompileSpec(
                        f"lora_bwd_dx x={xdt} ab={adt}/{prec}{'+' + lprec if lprec != prec else ''} atomic={int(atomic)} drop={int(drop)} "
                        f"{DX_BLOCK_M}x{cfg.kwargs['BLOCK_K']}x{cfg.kwargs['BLOCK_N']} r{meta['BLOCK_R']} "
                        f"w{cfg.num_warps} s{cfg.num_stages}",
                        _lora_bwd_dx_kernel, sig, consts, cfg.num_warps, cfg.num_stages, attrs=attrs))
    return specs
