"""DoRA's weight norm without the N×K matrix W0 + s·B·A.

    n[i] = ‖W0[i, :] + s·(B·A)[i, :]‖        for every output row i (DoRA's column norm, PEFT's weight_norm)

expanded so that W0 is read once and nothing N×K is ever formed:

    n[i]² = ‖W0[i]‖²  +  2s · Σ_j B[i, j]·P[i, j]  +  s² · Σ_j B[i, j]·(B·G)[i, j]
    P = W0·Aᵀ (N, r)          G = A·Aᵀ (r, r), the Gram of A (the launcher forms it: r²·K flops)

Shapes: W0 (N, K), or (K, N) for fan_in_fan_out (read through strides, never copied) · A (r, K) · B (N, r) ·
G (r, r) float32 · w2 = ‖W0[i]‖² (N,) float32 · n (N,) float32 (float64 for float64 W0, as every accumulator).

One program per BLOCK_N rows of W0. It streams those rows once, accumulating the P tile (BLOCK_N, BLOCK_R) by
tl.dot and, unless the caller has ‖W0[i]‖² cached (W0 frozen), the squares of the same tiles; then combines P with
B and G into n. Memory-bound: N·K elements read, 2·N·K·r flops. Ranks above BLOCK_R are walked in chunks (one
pass over the rows per chunk; BLOCK_R is up to 64, so this happens only for r > 64). fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _mma, interpreting
from ._specs import CompileSpec, specialize
from .policy import acc_dtype, fp32_precision

# ---------------------------------------------------------------------------
# configs (every one compiles for sm_80 and sm_90 without spills: python -m fastlora.inspect --only dora)
# ---------------------------------------------------------------------------

MAX_BLOCK_R = 64


def block_r(r: int) -> int:
    """Rank chunk: a tl.dot-legal power of two >= 16, at most MAX_BLOCK_R."""
    return max(16, min(triton.next_power_of_2(max(r, 1)), MAX_BLOCK_R))


def norm_configs(fp32: bool) -> list[dict]:
    """Tile candidates (first = default). Few rows per program: at d 4096 a 32-row block is 128 programs, about
    one per SM on an H100/H200, each streaming 32 rows of W0 through a pipelined K-loop."""
    if interpreting():
        return [dict(BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)]
    bk = 64 if fp32 else 128
    return [dict(BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=3),
            dict(BLOCK_N=16, BLOCK_K=bk, num_warps=4, num_stages=4),
            dict(BLOCK_N=64, BLOCK_K=bk // 2, num_warps=4, num_stages=3)]


def norm_precision(w_dtype: torch.dtype) -> str:
    """input_precision of the fp32 dots (W0·Aᵀ with fp32 adapters on a half base, B·G): torch's matmul setting on
    an fp32 base (fastlora.kernels.policy.fp32_precision), "tf32x3" (about fp32) on a half base; n must be as
    good as an fp32 computation of ‖W0 + s·B·A‖. Half×half dots (bf16 W0 and A) are exact products anyway."""
    if w_dtype in (torch.float16, torch.bfloat16):
        return "tf32x3"
    return fp32_precision(w_dtype)


# ---------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, g_ptr, w2_ptr, n_ptr, scale_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_gi, stride_gj,
    # meta-parameters
    COMPUTE_W2: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """n[rows] for one block of BLOCK_N rows of W0 (and w2[rows] when COMPUTE_W2). Grid (cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N

    ACC = n_ptr.dtype.element_ty                            # fp32 (fp64 for fp64 inputs)
    scale = tl.load(scale_ptr).to(ACC)
    if COMPUTE_W2:
        w2 = tl.zeros((BLOCK_N,), dtype=ACC)                # ‖W0[i]‖², accumulated on the first rank chunk's pass
    else:
        w2 = tl.load(w2_ptr + rn, mask=n_ok, other=0.0).to(ACC)   # cached by the caller (W0 frozen)
    cross = tl.zeros((BLOCK_N,), dtype=ACC)                 # Σ_j B[i, j]·P[i, j]
    quad = tl.zeros((BLOCK_N,), dtype=ACC)                  # Σ_j B[i, j]·(B·G)[i, j]

    for r0 in range(0, R, BLOCK_R):
        rc = r0 + rr
        rc_ok = rc < R
        # P[:, chunk] = W0[rows, :]·Aᵀ[:, chunk], one pass over the block's rows
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk      # (BLOCK_N, BLOCK_K)
        a_ptrs = a_ptr + rk[:, None] * stride_ak + rc[None, :] * stride_ar                    # (BLOCK_K, BLOCK_R) of Aᵀ
        p = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=k_ok[:, None] & rc_ok[None, :], other=0.0)
            p = _mma(w, a, p, FP32_PRECISION)
            if COMPUTE_W2:
                if r0 == 0:
                    wf = w.to(ACC)
                    w2 += tl.sum(wf * wf, axis=1)
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rc[None, :] * stride_br,
                    mask=n_ok[:, None] & rc_ok[None, :], other=0.0).to(ACC)                   # (BLOCK_N, BLOCK_R)
        cross += tl.sum(b * p, axis=1)
        # (B·G)[:, chunk] = Σ over rank chunks i0 of B[:, i0 chunk]·G[i0 chunk, chunk]
        bg = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
        for i0 in range(0, R, BLOCK_R):
            ri = i0 + rr
            ri_ok = ri < R
            bi = tl.load(b_ptr + rn[:, None] * stride_bn + ri[None, :] * stride_br,
                         mask=n_ok[:, None] & ri_ok[None, :], other=0.0).to(ACC)
            g = tl.load(g_ptr + ri[:, None] * stride_gi + rc[None, :] * stride_gj,
                        mask=ri_ok[:, None] & rc_ok[None, :], other=0.0)
            bg = _mma(bi, g, bg, FP32_PRECISION)
        quad += tl.sum(bg * b, axis=1)

    sq = w2 + 2.0 * scale * cross + scale * scale * quad
    tl.store(n_ptr + rn, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_ok)   # rounding can take a ~0 norm below 0
    if COMPUTE_W2:
        tl.store(w2_ptr + rn, w2, mask=n_ok)


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------

_forced: dict = {}   # tests may pin a config here (benchmarks/tests only; never set by the library)


def _config(N: int, fp32: bool, device: torch.device) -> dict:
    """The default candidate; a smaller row block when the default leaves SMs idle (programs counted, not timed)."""
    if "norm" in _forced:
        return _forced["norm"]
    cands = norm_configs(fp32)
    if device.type != "cuda" or interpreting():
        return cands[0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ok = [c for c in cands if triton.cdiv(N, c["BLOCK_N"]) >= sms]
    return ok[0] if ok else min(cands, key=lambda c: c["BLOCK_N"])


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
              fan_in_fan_out: bool, w2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, w2): n = ‖W0 + s·B·A‖ per output row and w2 = ‖W0‖² per row, both (N,) float32 (float64 for a
    float64 W0). ``w2`` given (a cache of a frozen W0): it is read, not recomputed, and returned as it is.
    ``scale``: 0-d tensor on the device (a runtime value). Inputs are not differentiated (n is detached in DoRA)."""
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    R, K = lora_A.shape
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if fan_in_fan_out else weight.stride()
    acc = acc_dtype(weight.dtype)
    a = lora_A.detach().to(acc)
    gram = a @ a.t()                                               # (r, r): r²·K flops, once per call
    n = torch.empty(N, device=weight.device, dtype=acc)
    compute = w2 is None
    if compute:
        w2 = torch.empty(N, device=weight.device, dtype=acc)
    if N == 0:
        return n, w2
    cfg = _config(N, weight.dtype in (torch.float32, torch.float64), weight.device)
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    _dora_norm_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        weight, lora_A, lora_B, gram, w2, n, scale.to(acc),
        N, K, R,
        stride_wn, stride_wk, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        gram.stride(0), gram.stride(1),
        COMPUTE_W2=compute, FP32_PRECISION=norm_precision(weight.dtype), BLOCK_R=block_r(R),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta)
    return n, w2


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect (compile for sm_80 / sm_90 without a GPU)
# ---------------------------------------------------------------------------

SPEC_N = SPEC_K = 4096
# (W0 dtype, adapter dtype, fp32 dot precision): half bases with half or fp32 adapters; fp32 with torch's default
# (ieee) and with tf32 allowed
SPEC_DTYPES = (("bf16", "bf16", "tf32x3"), ("bf16", "fp32", "tf32x3"), ("fp16", "fp16", "tf32x3"),
               ("fp16", "fp32", "tf32x3"), ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32"))


def compile_specs():
    specs = []
    for wdt, adt, prec in SPEC_DTYPES:
        for br in (16, 32, 64):
            values = dict(N=SPEC_N, K=SPEC_K, R=br, stride_wn=SPEC_K, stride_wk=1, stride_ar=SPEC_K,
                          stride_ak=1, stride_bn=br, stride_br=1, stride_gi=br, stride_gj=1)
            for w2 in (True, False):
                for cfg in norm_configs(wdt == "fp32"):
                    meta = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=br, COMPUTE_W2=w2,
                                FP32_PRECISION=prec)
                    sig, consts, attrs = specialize(_dora_norm_kernel, meta, {
                        "w_ptr": wdt, "a_ptr": adt, "b_ptr": adt, "g_ptr": "fp32", "w2_ptr": "fp32",
                        "n_ptr": "fp32", "scale_ptr": "fp32"}, values)
                    name = (f"dora_norm W={wdt} ab={adt}/{prec} w2={int(w2)} {cfg['BLOCK_N']}x{cfg['BLOCK_K']} "
                            f"r{br} w{cfg['num_warps']} s{cfg['num_stages']}")
                    specs.append(CompileSpec(name, _dora_norm_kernel, sig, consts, cfg["num_warps"],
                                             cfg["num_stages"], attrs=attrs))
    return specs


__all__ = ["dora_norm", "compile_specs", "norm_configs", "block_r"]
