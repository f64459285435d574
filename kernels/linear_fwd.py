"""Fused LoRA linear, forward.

    y = x·Wᵀ + bias + s · S·Bᵀ          S = dropout(x)·Aᵀ = (x ⊙ keep)·Aᵀ / (1 − p)

Shapes: x (M, K) seen through strides as (M // T, T, K) · W (N, K), or (K, N) for fan_in_fan_out
(strides, never a copy) · bias (N,) · A (r, K) · B (N, r) · S (M, r) float32 · y (M, N) in x's dtype.

Two variants, both exact, chosen per shape by timing on the device (``FASTLORA_FWD_VARIANT`` pins one):
  one-launch  the GEMM's K-loop also accumulates S_tile = drop(x_tile)·A_tileᵀ (BLOCK_M × BLOCK_R, fp32)
              from the x tile it already holds; the epilogue adds s·S_tile·B_tileᵀ and bias and rounds
              once. No extra HBM traffic; R/BLOCK_N extra MMA work per tile; S is written by the
              pid_n == 0 programs when backward needs it. Ranks up to MAX_FUSED_R (16).
  two-launch  _lora_shrink_kernel writes S (small); the GEMM's epilogue reads it, in rank chunks of
              GEMM_BLOCK_R (16), so any rank works. One extra read of x, but the dropout mask is drawn once per
              element of x instead of once per N tile, which wins when p > 0.
Dropout: keep = uniform(Philox(seed, row·⌈K/4⌉ + col // 4)[col % 4]) >= p (see _common._keep); p = 0
draws nothing.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (GEMM_BLOCK_R, MAX_BLOCK_R, MAX_FUSED_R, _grouped_tile, _keep, _mma, _x_row_offsets,
                      acc_dtype, block_r, fp32_precision, interpreting, lora_precision, m_bucket, union,
                      wants_fp32_tiles, x_as_3d)
from ._specs import CompileSpec, specialize

# ---------------------------------------------------------------------------
# autotune configs, one function per target
# ---------------------------------------------------------------------------


# Every config below compiles for sm_80 and sm_90 with zero spill bytes under every flag combination
# (python -m fastlora.inspect); candidates that spilled were dropped, not hidden.


def _gemm_configs(fp32: bool = False, one_launch: bool = True):
    """GEMM tiles; fp32 inputs get BLOCK_K = 32 (same bytes per stage as 64 half-precision columns).
    The two-launch GEMM (no S tile held through the K-loop) also tries the large Hopper tiles 128x256 and
    256x128 (an H200 run had 128x128 at ~490 TFLOP/s where cuBLAS reached ~770); next to the one-launch
    kernel's S they spill."""
    if interpreting():   # the interpreter is slow and has no tiles to tune: one small config
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    cfg = lambda bm, bn, bk, w, s: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    if fp32:
        return [cfg(64, 128, 32, 8, 3), cfg(128, 64, 32, 8, 3), cfg(64, 64, 32, 4, 4), cfg(64, 64, 32, 4, 3)]
    tiles = [cfg(128, 128, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(64, 128, 64, 8, 3), cfg(128, 64, 64, 8, 3),
             cfg(64, 64, 64, 4, 4)]
    return tiles if one_launch else tiles + [cfg(128, 256, 64, 8, 3), cfg(256, 128, 64, 8, 3)]


def _shrink_configs(fp32: bool = False):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    cfg = lambda bm, bk, w, s: triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)  # noqa: E731
    if fp32:
        return [cfg(64, 32, 4, 4), cfg(64, 32, 4, 3)]
    return [cfg(64, 64, 4, 4), cfg(64, 64, 4, 3), cfg(64, 32, 4, 4)]


def _prune_by_dtype(configs_of):
    """early_config_prune: keep the tile set made for the input dtype (x_ptr's; fp32 tiles for tf32x3) and,
    for the GEMM, for its variant (SHRINK_IN_LOOP)."""
    def prune(configs, named_args, **kwargs):
        variant = {"one_launch": kwargs["SHRINK_IN_LOOP"]} if "SHRINK_IN_LOOP" in kwargs else {}
        keep = {str(c) for c in configs_of(wants_fp32_tiles(named_args, "x_ptr", kwargs), **variant)}
        return [c for c in configs if str(c) in keep] or configs
    return prune


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr,
    # sizes
    M, K, R, T, M_BUCKET,
    # dropout
    p, inv_keep,
    # strides
    stride_xb, stride_xt, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[rows, rank chunk] = (x ⊙ keep)[rows, :]·Aᵀ[:, rank chunk] / (1 − p).  Grid (M / BLOCK_M, R / BLOCK_R)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R

    x_ptrs = x_ptr + _x_row_offsets(rm, T, stride_xb, stride_xt)[:, None] + rk[None, :] * stride_xk
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
def _lora_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, scale_ptr, seed_ptr,
    # sizes
    M, N, K, R, T, M_BUCKET,
    # dropout
    p, inv_keep,
    # strides
    stride_xb, stride_xt, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
    STORE_S: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y tile (BLOCK_M, BLOCK_N). SHRINK_IN_LOOP: one-launch (S from the K-loop, BLOCK_R ≥ R);
    else two-launch (S read from s_ptr in the epilogue, rank chunks of BLOCK_R). Grid: tiles of y."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R

    x_ptrs = x_ptr + _x_row_offsets(rm, T, stride_xb, stride_xt)[:, None] + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn          # (BLOCK_K, BLOCK_N) of Wᵀ
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar          # (BLOCK_K, BLOCK_R) of Aᵀ
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0

    ACC = s_ptr.dtype.element_ty                                                # fp32 (fp64 for fp64 inputs)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(x, w, acc, FP32_PRECISION)
        if SHRINK_IN_LOOP:
            a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rm, k0, K, p, BLOCK_M, BLOCK_K), x, 0.0)
            s_acc = _mma(x, a, s_acc, FP32_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: acc += (s·S)·Bᵀ, straight into the GEMM's accumulator (no second (BLOCK_M, BLOCK_N) tile)
    scale = tl.load(scale_ptr).to(ACC)
    if SHRINK_IN_LOOP:
        s_tile = s_acc * inv_keep
        if STORE_S:
            if pid_n == 0:   # one writer per row tile
                s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
                tl.store(s_ptrs, s_tile, mask=m_ok[:, None] & r_ok[None, :])
        b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)              # (BLOCK_R, BLOCK_N) of Bᵀ
        acc = _mma(s_tile * scale, b, acc, FP32_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            rc_ok = (r0 + rr) < R
            s_tile = tl.load(s_ptr + rm[:, None] * stride_sm + (r0 + rr)[None, :] * stride_sr,
                             mask=m_ok[:, None] & rc_ok[None, :], other=0.0)
            b = tl.load(b_ptr + (r0 + rr)[:, None] * stride_br + rn[None, :] * stride_bn,
                        mask=rc_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(s_tile * scale, b, acc, FP32_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_gemm = triton.autotune(configs=union(_gemm_configs(False, one_launch=False),       # every tile list
                                      _gemm_configs(True, one_launch=False)),
                        key=["M_BUCKET", "N", "K", "SHRINK_IN_LOOP", "HAS_DROPOUT"],
                        prune_configs_by={"early_config_prune": _prune_by_dtype(_gemm_configs)})(_lora_fwd_kernel)
_shrink = triton.autotune(configs=union(_shrink_configs(False), _shrink_configs(True)),
                          key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT", "FP32_PRECISION"],
                          prune_configs_by={"early_config_prune": _prune_by_dtype(_shrink_configs)})(_lora_shrink_kernel)

# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------

VARIANTS = ("one", "two")
_variant_cache: dict = {}


def _launch(variant, x3, M, T, sxb, sxt, sxk, w, bias, a, b, scale, seed, p, fan_in_fan_out, save_s):
    N = w.shape[1] if fan_in_fan_out else w.shape[0]
    K, R = a.shape[1], a.shape[0]
    stride_wn, stride_wk = (w.stride(1), w.stride(0)) if fan_in_fan_out else (w.stride(0), w.stride(1))
    y = torch.empty((M, N), device=x3.device, dtype=x3.dtype)
    one = variant == "one"
    S = torch.empty((M, R) if (save_s or not one) else (0, R), device=x3.device, dtype=acc_dtype(x3.dtype))
    prec = fp32_precision(x3.dtype)
    s_prec = lora_precision(x3.dtype, a.dtype) if save_s else prec    # S saved for dB: see lora_precision
    assert not (one and s_prec != prec), "a tf32x3 S is computed by the shrink kernel (two-launch)"
    inv_keep = 1.0 / (1.0 - p)
    if not one:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"]))  # noqa: E731
        _shrink[grid](x3, a, S, seed, M, K, R, T, m_bucket(M), p, inv_keep, sxb, sxt, sxk,
                      a.stride(0), a.stride(1), S.stride(0), S.stride(1), BLOCK_R=block_r(R, s_prec),
                      HAS_DROPOUT=p > 0, FP32_PRECISION=s_prec)
    _run_gemm(x3, M, T, sxb, sxt, sxk, (w, stride_wn, stride_wk), N, bias, a, (b, b.stride(0), b.stride(1)), S,
              y, scale, seed, p, one, one and save_s, prec)
    return y, (S if save_s else S[:0])


def _run_gemm(x3, M, T, sxb, sxt, sxk, w_strided, N, bias, a, b_strided, S, y, scale, seed, p, one, store_s, prec):
    """The GEMM kernel on y (M, N): w_strided = (W, stride over n, stride over k), b_strided = (B, stride over
    n, stride over r); a (r, K) is read only by the one-launch variant."""
    (w, stride_wn, stride_wk), (b, stride_bn, stride_br) = w_strided, b_strided
    K, R = x3.shape[-1], S.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm[grid](x3, w, bias if bias is not None else y, a, b, S, y, scale, seed,
                M, N, K, R, T, m_bucket(M), p, 1.0 / (1.0 - p), sxb, sxt, sxk, stride_wn, stride_wk,
                a.stride(0), a.stride(1), stride_bn, stride_br,
                S.stride(0) if S.numel() else 0, S.stride(1) if S.numel() else 0,
                y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None, SHRINK_IN_LOOP=one, STORE_S=store_s, BLOCK_R=GEMM_BLOCK_R,
                HAS_DROPOUT=p > 0, FP32_PRECISION=prec)


def gemm_lowrank(x, w_strided, N: int, L: torch.Tensor, b_strided) -> torch.Tensor:
    """y (M, N) = x·Wᵀ + L·Bᵀ in x's dtype, one rounding: the two-launch forward's GEMM with a given low-rank
    factor L (M, r) (fp32; fp64 for fp64 x) in place of S and scale 1. W and B come with explicit strides
    (w_strided = (W, stride over n, stride over k), b_strided = (B, stride over n, stride over r)), so the
    backward can run dx = dY·W + dS·A on it (x = dY, W = W0ᵀ, B = Aᵀ) — see linear_bwd's "split" variant."""
    x3, M, T, sxb, sxt, sxk = x_as_3d(x)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    one = torch.ones((), device=x.device, dtype=acc_dtype(x.dtype))
    no_seed = torch.zeros((), device=x.device, dtype=torch.int64)        # never read (no dropout)
    _run_gemm(x3, M, T, sxb, sxt, sxk, w_strided, N, None, L, b_strided, L, y, one, no_seed, 0.0, False, False,
              fp32_precision(x.dtype))
    return y


def _choose_variant(args, key, rank: int, p: float, on_gpu: bool, x3_s: bool = False) -> str:
    """FASTLORA_FWD_VARIANT pins one; off the GPU (interpreter) one-launch, or two-launch with dropout;
    on a GPU both are timed once per shape key and the faster kept. Two-launch is forced where the
    one-launch kernel cannot serve: rank > MAX_FUSED_R, or an S that must be saved in tf32x3 (x3_s:
    fp32 adapters on a half base in training; those dots next to the GEMM tile spill on sm_80)."""
    pinned = os.environ.get("FASTLORA_FWD_VARIANT", "auto")
    if pinned not in ("auto",) + VARIANTS:
        raise ValueError(f"FASTLORA_FWD_VARIANT must be 'auto', 'one' or 'two', got {pinned!r}")
    if rank > MAX_FUSED_R or x3_s:
        return "two"                      # S does not fit in registers next to the tile
    if pinned != "auto":
        return pinned
    if not on_gpu:
        return "two" if p > 0 else "one"
    if key not in _variant_cache:
        ms = {v: triton.testing.do_bench(lambda v=v: _launch(v, *args)) for v in VARIANTS}
        _variant_cache[key] = min(ms, key=ms.get)
    return _variant_cache[key]


def lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s):
    """Returns (y (..., N) in x's dtype, S (M, r) float32 (float64 for float64 x) — (0, r) when not ``save_s``)."""
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    x3, M, T, sxb, sxt, sxk = x_as_3d(x)
    if M == 0 or x.shape[-1] == 0:
        y = torch.zeros((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
        if bias is not None and M:
            y += bias.to(x.dtype)
        return y, torch.zeros((M if save_s else 0, lora_A.shape[0]), device=x.device, dtype=acc_dtype(x.dtype))
    args = (x3, M, T, sxb, sxt, sxk, weight, bias, lora_A, lora_B, scale, seed, float(dropout_p),
            fan_in_fan_out, save_s)
    key = (m_bucket(M), N, x.shape[-1], lora_A.shape[0], x.dtype, lora_A.dtype, dropout_p > 0,
           bias is not None, save_s)
    x3_s = save_s and lora_precision(x.dtype, lora_A.dtype) != fp32_precision(x.dtype)
    variant = _choose_variant(args, key, lora_A.shape[0], float(dropout_p), x.is_cuda and not interpreting(), x3_s)
    y, S = _launch(variant, *args)
    return y.reshape(*x.shape[:-1], N), S


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect (compile for sm_80 / sm_90 without a GPU)
# ---------------------------------------------------------------------------


# A typical launch (contiguous tensors, 4096-sized dims, rank 64 = the largest rank block) for the compile check.
SPEC_M = SPEC_N = SPEC_K = 4096
SPEC_R = MAX_BLOCK_R
# (x dtype, adapter dtype, fp32 dot precision, precision of the gradient-feeding dots (lora_precision)):
# half bases (fp32 adapters: tf32x3 there), fp32 with torch's default (ieee) and with allow_tf32
SPEC_DTYPES = (("bf16", "bf16", "tf32", "tf32"), ("bf16", "fp32", "tf32", "tf32x3"), ("fp16", "fp16", "tf32", "tf32"),
               ("fp32", "fp32", "ieee", "ieee"), ("fp32", "fp32", "tf32", "tf32"))


def compile_specs():
    M, N, K, R = SPEC_M, SPEC_N, SPEC_K, SPEC_R
    values = dict(M=M, N=N, K=K, R=R, T=M, M_BUCKET=M, stride_xb=0, stride_xt=K, stride_xk=1,
                  stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1,
                  stride_sm=R, stride_sr=1, stride_ym=N, stride_yn=1)
    specs = []
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        for drop in (False, True):
            for one in (True, False):
                for cfg in _gemm_configs(xdt == "fp32", one_launch=one):
                    meta = dict(cfg.kwargs, HAS_BIAS=True, HAS_DROPOUT=drop, SHRINK_IN_LOOP=one,
                                STORE_S=one, FP32_PRECISION=prec, BLOCK_R=GEMM_BLOCK_R)
                    sig, consts, attrs = specialize(_lora_fwd_kernel, meta, {
                        "x_ptr": xdt, "w_ptr": xdt, "bias_ptr": xdt, "a_ptr": adt, "b_ptr": adt,
                        "s_ptr": "fp32", "y_ptr": xdt, "scale_ptr": "fp32", "seed_ptr": "i64"}, values,
                        floats=("p", "inv_keep"))
                    name = (f"lora_fwd[{'one' if one else 'two'}-launch] x={xdt} ab={adt}/{prec} drop={int(drop)} "
                            f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} "
                            f"r{meta['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}")
                    specs.append(CompileSpec(name, _lora_fwd_kernel, sig, consts, cfg.num_warps, cfg.num_stages,
                                             attrs=attrs))
            # S for y only (eval: prec) and S saved for dB (training: lprec), each with its tile list
            for sprec, cfg in [(sp, c) for sp in dict.fromkeys((prec, lprec))
                               for c in _shrink_configs(xdt == "fp32" or sp == "tf32x3")]:
                meta = dict(cfg.kwargs, HAS_DROPOUT=drop, FP32_PRECISION=sprec, BLOCK_R=block_r(R, sprec))
                sig, consts, attrs = specialize(_lora_shrink_kernel, meta, {
                    "x_ptr": xdt, "a_ptr": adt, "s_ptr": "fp32", "seed_ptr": "i64"}, values,
                    floats=("p", "inv_keep"))
                name = (f"lora_shrink x={xdt} ab={adt}/{sprec} drop={int(drop)} {cfg.kwargs['BLOCK_M']}x"
                        f"{cfg.kwargs['BLOCK_K']} r{meta['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}")
                specs.append(CompileSpec(name, _lora_shrink_kernel, sig, consts, cfg.num_warps, cfg.num_stages,
                                         attrs=attrs))
        # the backward's "split" dx (gemm_lowrank): dY·W0ᵀ + dS·A on the two-launch GEMM — W read transposed
        # (as for fan_in_fan_out), B = Aᵀ, no bias, no dropout, the low-rank factor fp32
        wt = dict(values, stride_wn=1, stride_wk=N, stride_bn=1, stride_br=K)
        for cfg in _gemm_configs(xdt == "fp32", one_launch=False):
            meta = dict(cfg.kwargs, HAS_BIAS=False, HAS_DROPOUT=False, SHRINK_IN_LOOP=False, STORE_S=False,
                        FP32_PRECISION=prec, BLOCK_R=GEMM_BLOCK_R)
            sig, consts, attrs = specialize(_lora_fwd_kernel, meta, {
                "x_ptr": xdt, "w_ptr": xdt, "bias_ptr": xdt, "a_ptr": "fp32", "b_ptr": adt,
                "s_ptr": "fp32", "y_ptr": xdt, "scale_ptr": "fp32", "seed_ptr": "i64"}, wt, floats=("p", "inv_keep"))
            name = (f"lora_fwd[split-dx, Wᵀ] x={xdt} ab={adt}/{prec} drop=0 "
                    f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} "
                    f"r{meta['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}")
            specs.append(CompileSpec(name, _lora_fwd_kernel, sig, consts, cfg.num_warps, cfg.num_stages,
                                     attrs=attrs))
    return specs


__all__ = ["lora_fwd", "gemm_lowrank", "compile_specs", "VARIANTS"]
