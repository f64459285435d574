"""DoRA's weight norm without the N×K matrix W0 + s·B·A.

    n[i] = ‖W0[i, :] + s·(B·A)[i, :]‖        for every output row i (DoRA's column norm, PEFT's weight_norm)

expanded so that W0 is read once and nothing N×K is ever formed:

    n[i]² = ‖W0[i]‖²  +  2s · Σ_j B[i, j]·P[i, j]  +  s² · q[i]
    P = W0·Aᵀ (N, r)          q[i] = B[i]·G·B[i]ᵀ with G = A·Aᵀ (r, r), the Gram of A

The launcher forms G (r²·K flops) and q (N·r² flops) with torch: both are tiny and touch no N×K data. The kernel
does the memory-bound part, the pass over W0, and the combination.

Shapes: W0 (N, K), or (K, N) for fan_in_fan_out (read through strides, never copied) · A (r, K) · B (N, r) ·
q (N,) float32 · w2 = ‖W0[i]‖² (N,) float32 · n (N,) float32 (float64 for float64 W0, as every accumulator).

One program per BLOCK_N rows of W0. It streams those rows once, accumulating the P tile (BLOCK_N, BLOCK_R) by
tl.dot and, unless the caller has ‖W0[i]‖² cached (W0 frozen), the squares of the same tiles; then combines P with
B and q into n. Memory-bound: N·K elements read, 2·N·K·r flops. Ranks above BLOCK_R are walked in chunks (one
pass over the rows per chunk; BLOCK_R is up to 64). fp32 accumulation.

fp32 adapters on a half W0 (PEFT's default): the launcher splits A into A_hi + A_lo, both in W0's dtype (A_lo =
the rounding residual of A_hi), and B into [B, B]: the kernel then sees rank 2r in W0's dtype, so every dot is a
native half-precision MMA with exact products and fp32 accumulation, P = W0·A_hiᵀ + W0·A_loᵀ to about 16 (bf16)
or 22 (fp16) significant bits (tf32x3 dots next to the W0 tile spilled registers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import policy
from ._common import _mma
from ._specs import CompileSpec, cfg_name, shipped, specialize
from ._tiles import _span

# ---------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, q_ptr, w2_ptr, n_ptr, scale_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    # meta-parameters
    COMPUTE_W2: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """n[rows] for one block of BLOCK_N rows of W0 (and w2[rows] when COMPUTE_W2). Grid (cdiv(N, BLOCK_N),)."""
    rn, n_ok = _span(tl.program_id(0), BLOCK_N, N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)

    ACC = n_ptr.dtype.element_ty                            # fp32 (fp64 for fp64 inputs)
    scale = tl.load(scale_ptr).to(ACC)
    if COMPUTE_W2:
        w2 = tl.zeros((BLOCK_N,), dtype=ACC)                # ‖W0[i]‖², accumulated on the first rank chunk's pass
    else:
        w2 = tl.load(w2_ptr + rn, mask=n_ok, other=0.0).to(ACC)   # cached by the caller (W0 frozen)
    cross = tl.zeros((BLOCK_N,), dtype=ACC)                 # Σ_j B[i, j]·P[i, j]

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

    quad = tl.load(q_ptr + rn, mask=n_ok, other=0.0)        # B[i]·G·B[i]ᵀ
    sq = w2 + 2.0 * scale * cross + scale * scale * quad
    tl.store(n_ptr + rn, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_ok)   # rounding can take a ~0 norm below 0
    if COMPUTE_W2:
        tl.store(w2_ptr + rn, w2, mask=n_ok)


# ---------------------------------------------------------------------------
# launcher (tile config: kernels/policy.py, kernel "dora_norm")
# ---------------------------------------------------------------------------


def norm_precision(w_dtype: torch.dtype) -> str:
    """input_precision of the W0·Aᵀ dot: on an fp32 W0 torch's CUDA matmul setting (ieee by default, tf32 when
    allowed; policy.fp32_precision). Half W0 dots are native half MMAs (exact products, fp32 accumulation: the
    flag is not used)."""
    return policy.fp32_precision(w_dtype)


def split_hi_lo(lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype):
    """fp32 adapters on a half W0: (A2, B2) with A2 = [A_hi; A_lo] (2r, K) in ``dtype`` (A_hi = A rounded,
    A_lo = its residual rounded) and B2 = [B, B] (N, 2r), so that Σ_j B2[i, j]·(W0·A2ᵀ)[i, j] = Σ_j B[i, j]·
    (W0·Aᵀ)[i, j] up to the residual's own rounding. r×K and N×r sized: no N×K tensor."""
    hi = lora_A.to(dtype)
    lo = (lora_A - hi.to(lora_A.dtype)).to(dtype)
    return torch.cat([hi, lo]), torch.cat([lora_B, lora_B], dim=1)


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
              fan_in_fan_out: bool, w2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, w2): n = ‖W0 + s·B·A‖ per output row and w2 = ‖W0‖² per row, both (N,) float32 (float64 for a
    float64 W0). ``w2`` given (a cache of a frozen W0): it is read, not recomputed, and returned as it is.
    ``scale``: 0-d tensor on the device (a runtime value). Inputs are not differentiated (n is detached in DoRA)."""
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if fan_in_fan_out else weight.stride()
    acc = policy.acc_dtype(weight.dtype)
    a, b = lora_A.detach().to(acc), lora_B.detach().to(acc)
    quad = ((b @ (a @ a.t())) * b).sum(1)                          # B_i·G·B_iᵀ: r²·K + N·r² flops
    A, B = lora_A.detach(), lora_B.detach()
    if weight.dtype in (torch.float16, torch.bfloat16) and A.dtype != weight.dtype:
        A, B = split_hi_lo(A, B, weight.dtype)
    R, K = A.shape
    n = torch.empty(N, device=weight.device, dtype=acc)
    compute = w2 is None
    if compute:
        w2 = torch.empty(N, device=weight.device, dtype=acc)
    if N == 0:
        return n, w2
    prec = norm_precision(weight.dtype)
    meta, opts = policy.launch_options(policy.config("dora_norm", weight.dtype, prec, N, K, R, weight.device))
    _dora_norm_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
        weight, A, B, quad, w2, n, scale.to(acc),
        N, K, R,
        stride_wn, stride_wk, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        COMPUTE_W2=compute, FP32_PRECISION=prec, BLOCK_R=policy.block_r(R), **meta, **opts)
    return n, w2


# ---------------------------------------------------------------------------
# shipped configs, for python -m fastlora.inspect (compile for sm_80 / sm_90 without a GPU)
# ---------------------------------------------------------------------------

SPEC_N = SPEC_K = 4096
# (W0 dtype, A/B dtype as the kernel sees them, fp32 dot precision): half W0 (fp32 adapters arrive split into
# W0's dtype, see split_hi_lo, and B doubled: still fp32), fp32 with torch's default (ieee) and with tf32 allowed
SPEC_DTYPES = (("bf16", "bf16", "bf16", "tf32"), ("bf16", "bf16", "fp32", "tf32"), ("fp16", "fp16", "fp16", "tf32"),
               ("fp16", "fp16", "fp32", "tf32"), ("fp32", "fp32", "fp32", "ieee"), ("fp32", "fp32", "fp32", "tf32"))


def compile_specs():
    specs = []
    for wdt, adt, bdt, prec in SPEC_DTYPES:
        for br in (16, 32, 64):
            values = dict(N=SPEC_N, K=SPEC_K, R=br, stride_wn=SPEC_K, stride_wk=1, stride_ar=SPEC_K,
                          stride_ak=1, stride_bn=br, stride_br=1)
            for w2 in (True, False):
                for cfg in shipped("dora_norm", wdt, prec):
                    meta, opts = policy.launch_options(cfg)
                    meta.update(BLOCK_R=br, COMPUTE_W2=w2, FP32_PRECISION=prec)
                    sig, consts, attrs = specialize(_dora_norm_kernel, meta, {
                        "w_ptr": wdt, "a_ptr": adt, "b_ptr": bdt, "q_ptr": "fp32", "w2_ptr": "fp32",
                        "n_ptr": "fp32", "scale_ptr": "fp32"}, values)
                    tile, launch = cfg_name(cfg).split(" ", 1)
                    name = f"dora_norm W={wdt} A={adt} B={bdt}/{prec} w2={int(w2)} {tile} r{br} {launch}"
                    specs.append(CompileSpec(name, _dora_norm_kernel, sig, consts, opts["num_warps"],
                                             opts["num_stages"], attrs=attrs))
    return specs


__all__ = ["dora_norm", "compile_specs", "norm_precision", "split_hi_lo"]
