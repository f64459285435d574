"""DoRA (weight-decomposed LoRA, Liu et al. 2024): PEFT's ``use_dora=True`` layers without the N×K matrix.

    y = base(x) + (m/n − 1)·(x̃·W0ᵀ) + (m/n)·s·(x̃·Aᵀ)·Bᵀ      x̃ = dropout(x), base(x) = x·W0ᵀ + bias
    n = ‖W0 + s·B·A‖ per output row, detached from the graph (DoRA §4.3; PEFT's weight_norm.detach())

m is the magnitude vector (N,) (PEFT's ``lora_magnitude_vector``), s the LoRA scaling. Without dropout (p = 0,
or not training) x̃ = x and PEFT reuses the base result, so y = (m/n)⊙(x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias; with dropout
the second GEMM on x̃ is part of PEFT's maths and is kept. Both are one formula with D = x̃ (D = x when p = 0):

    y  = (x − D)·W0ᵀ + bias + c⊙(v + s·S·Bᵀ)        c = m/n (N,),  v = D·W0ᵀ (M, N),  S = D·Aᵀ (M, r)

Gradients (n constant; g = dY⊙c, T = dYᵀ·S (N, r)):
    dS = s·g·B              dB = s·c⊙T = s·gᵀ·S        dA = dSᵀ·D
    dm = (Σ_rows dY⊙v + s·Σ_j B⊙T) / n               dbias = Σ_rows dY
    dx = dY·W0 + ((dY⊙(c − 1))·W0 + dS·A)⊙keep/(1 − p)      (p = 0: dx = g·W0 + dS·A)

The norm never forms W0 + s·B·A: n² = ‖W0_i‖² + 2s·Σ_j B[i,j]·(W0·Aᵀ)[i,j] + s²·B_i·(A·Aᵀ)·B_iᵀ — one pass over
W0 for W0·Aᵀ (N, r) and the r×r Gram, accumulated in fp32: kernels/dora_norm.py on the Triton backend; on the
torch backend W0·Aᵀ rides along the v GEMM (A's rows stacked under x), or row blocks of a half W0 are upcast.
‖W0_i‖² is cached per frozen W0 (keyed by its version counter and storage; see ``clear_norm_cache``).
Saved for backward: x, S (M, r), n (N,), v (M, N; only when m needs a gradient) — no N×K tensor; the dropout
mask is drawn again from its seed (eager CPU: kept bit-packed, 1/32 of an fp32 x). The GEMMs are torch matmuls
(cuBLAS on a GPU, as for the LoRA op: docs/usage.md); Triton only does the memory-bound norm pass.

PEFT correspondences (peft.tuners.lora.dora.DoraLinearLayer, variants.DoraLinearVariant, PEFT 0.21): x is cast
to the adapter dtype before the DoRA branch (so D, S, v are in the adapter dtype); m/n multiplies output columns;
bias is PEFT's base-layer bias, outside the scale; merge writes (m/n)⊙(W0 + s·B·A) with n from the unmerged W0,
unmerge divides it back out.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from torch import Tensor

from ..core.backend import resolve_backend_choice, select_backend
from ..core.checks import _constant, acc_dtype, check_inputs, op_scalars, weight_nk
from ..core.dropout import draw_keep, draw_packed, keep_mask, unpack_mask
from ..core.registration import register_op
from .lora import own_output

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# the maths, readable (the float64 oracle of the tests; builds the N×K matrix, as PEFT does)
# ---------------------------------------------------------------------------

def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, seed=0,
                          fan_in_fan_out=False, keep=None):
    """PEFT's DoRA forward in plain torch, differentiable, with PEFT's dtype flow (the DoRA branch in the adapter
    dtype, the sum cast back to x's); the dropout mask is ``keep`` (boolean, x's shape or (M, K)) if given, else
    the kernels' Philox mask for ``seed`` (dropout_p > 0 means training with dropout; 0 is PEFT's
    reuse-the-base-result path, mathematically the same formula with x̃ = x)."""
    W = weight_nk(weight, fan_in_fan_out)
    cdt = lora_A.dtype
    n = torch.linalg.vector_norm(W.to(cdt) + scaling * (lora_B @ lora_A), dim=1).detach()
    c = magnitude / n
    base = x @ W.t()
    if bias is not None:
        base = base + bias
    d = x.to(cdt)
    if dropout_p > 0:
        K = x.shape[-1]
        keep = keep_mask(seed, x.numel() // K, K, dropout_p, x.device) if keep is None else keep
        d = d * keep.reshape(x.shape) / (1 - dropout_p)
        v = d @ W.t().to(cdt)                             # the second GEMM, on x̃
    else:
        v = base - bias if bias is not None else base     # PEFT reuses the base result, less bias
    y = base + (c - 1) * v + c * scaling * ((d @ lora_A.t()) @ lora_B.t())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# pure-torch backend
# ---------------------------------------------------------------------------

NORM_BLOCK_ELEMENTS = 1 << 20   # a half W0 is upcast in row blocks of at most this many elements (4 MiB fp32)


def norm_from_p(P, w2, lora_A, lora_B, scale):
    """n = sqrt(w2 + 2s·Σ_j B⊙P + s²·B·(A·Aᵀ)·Bᵀ) per row, from P = W0·Aᵀ (N, r) and w2 = ‖W0‖² (N,), fp32/fp64."""
    acc = P.dtype
    a, b, s = lora_A.detach().to(acc), lora_B.detach().to(acc), scale.to(acc)
    sq = w2 + 2 * s * (b * P).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
    return sq.clamp_min_(0).sqrt_()


def torch_norm(weight, lora_A, lora_B, scale, fan_in_fan_out, w2=None):
    """(n, w2) as kernels.dora_norm.dora_norm: n = ‖W0 + s·B·A‖ and w2 = ‖W0‖² per row, (N,) fp32 (fp64 for fp64),
    from P = W0·Aᵀ and the Gram A·Aᵀ. An fp32/fp64 W0 is read in place; a half W0 is upcast block by block of
    rows (never all of it), so P is an fp32 product, as PEFT's fp32 path."""
    W = weight_nk(weight, fan_in_fan_out)
    N, K = W.shape
    acc = acc_dtype(weight.dtype)
    a = lora_A.detach().to(acc)
    if weight.dtype == acc:
        P = W @ a.t()
        if w2 is None:
            w2 = torch.linalg.vector_norm(W, dim=1).square()
    else:
        P = W.new_empty((N, a.shape[0]), dtype=acc)
        rows = max(1, NORM_BLOCK_ELEMENTS // max(K, 1))
        new_w2 = W.new_empty(N, dtype=acc) if w2 is None else None
        for i in range(0, N, rows):
            blk = W[i:i + rows].to(acc)
            torch.mm(blk, a.t(), out=P[i:i + rows])
            if new_w2 is not None:
                torch.linalg.vector_norm(blk, dim=1, out=new_w2[i:i + rows])
        if new_w2 is not None:
            w2 = new_w2.square_()
    return norm_from_p(P, w2, lora_A, lora_B, scale), w2


def _dropped(x2, cdt, p, seed, keep=None):
    """D = x ⊙ keep / (1 − p) in the adapter dtype (PEFT: x cast to lora_A's dtype, then dropout), and keep
    (the 1/0 mask in the adapter dtype, drawn from ``seed`` unless given: fastlora.core.dropout.draw_keep)."""
    keep = draw_keep(seed, x2.shape[0], x2.shape[1], p, x2.device, cdt) if keep is None else keep
    return (x2.to(cdt) * keep).div_(1 - p), keep


def _times_w0t(D, W):
    """v = D·W0ᵀ in D's dtype. fp32 D on a half W0 (PEFT upcasts all of W0): W0 upcast in row blocks instead."""
    if D.dtype == W.dtype:
        return D @ W.t()
    v = D.new_empty((D.shape[0], W.shape[0]))
    rows = max(1, NORM_BLOCK_ELEMENTS // max(W.shape[1], 1))
    for i in range(0, W.shape[0], rows):
        torch.mm(D, W[i:i + rows].to(D.dtype).t(), out=v[:, i:i + rows])
    return v


def forward(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed, fan_in_fan_out, save_v, save_s,
            backend, keep=None):
    """(y (..., N) in x's dtype, v (M, N) or (0, N), S (M, r) or (0, r), n (N,), new w2 (N,) or None).

    v and S in the adapter dtype (v in x's dtype without dropout: the base GEMM's result). n on the selected
    backend: the Triton kernel; or, on the torch backend with x, W0 and A of one full-precision dtype, P = W0·Aᵀ
    from the GEMM that computes v, with A's r rows stacked under the GEMM's left operand (P = (A·W0ᵀ)ᵀ: r/M more
    work in an efficient GEMM instead of a separate skinny one); else torch_norm. ``w2``: cached ‖W0‖² or None."""
    K = x.shape[-1]
    W = weight_nk(weight, fan_in_fan_out)
    N = W.shape[0]
    x2 = x.reshape(-1, K)
    M, r = x2.shape[0], lora_A.shape[0]
    cdt = lora_A.dtype
    s = scale                                                     # 0-d fp32: never rounded to a half dtype
    fuse = select_backend(x.device, backend) == "torch" and x.dtype == weight.dtype == cdt == acc_dtype(cdt)
    if dropout_p > 0:
        keep = draw_keep(seed, M, K, dropout_p, x.device, cdt) if keep is None else keep
        Dx = x2.new_empty((M + r if fuse else M, K), dtype=cdt)  # D = x ⊙ keep / (1 − p), PEFT's x̃ in cdt
        torch.mul(x2.to(cdt), keep, out=Dx[:M]).div_(1 - dropout_p)
        if fuse:
            Dx[M:] = lora_A.detach()
        vx = _times_w0t(Dx, W)                                    # the second GEMM, on x̃ (PEFT's)
        S = Dx[:M] @ lora_A.t()
        del Dx
    else:
        vx = (torch.cat([x2, lora_A.detach()]) if fuse else x2) @ W.t()   # base result less bias (PEFT reuses it)
        S = x2.to(cdt) @ lora_A.t()
    v = vx[:M]
    new_w2 = None
    if fuse:
        if w2 is None:
            w2 = new_w2 = torch.linalg.vector_norm(W, dim=1).square()
        n = norm_from_p(vx[M:].t(), w2, lora_A, lora_B, scale)
    else:
        n, got = norm_forward(weight, lora_A, lora_B, scale, fan_in_fan_out, w2, backend)
        new_w2 = got if w2 is None else None
    c = magnitude.to(n.dtype) / n                                 # (N,) m/n, fp32
    if dropout_p > 0:
        y = torch.addmm(bias.to(x.dtype), x2, W.t()) if bias is not None else x2 @ W.t()
        t = (S * s) @ lora_B.t()                                  # (M, N) adapter dtype
        t.mul_(c).addcmul_(v, (c - 1).to(t.dtype))
        y.add_(t)
    else:
        if cdt == x.dtype:
            y = torch.addmm(v, S * s, lora_B.t()) if save_v else v.addmm_(S * s, lora_B.t())
        else:                                                     # fp32 adapters on a half base: sum in fp32
            y = ((S * s) @ lora_B.t()).add_(v)
        y = torch.addcmul(bias, y, c, out=y) if bias is not None and bias.dtype == y.dtype else y.mul_(c)
        if bias is not None and bias.dtype != y.dtype:
            y.add_(bias)
        y = y.to(x.dtype)
    v = v if save_v else v.new_empty((0, N))
    S = S if save_s else S.new_empty((0, S.shape[1]))
    return y.reshape(*x.shape[:-1], N), v, S, n, new_w2


def torch_backward(dy, x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, dropout_p, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB, needs_dm, needs_dbias, needs_dW, keep=None):
    """(dx, dA, dB, dm, dbias, dW); entries not needed are None. See the module docstring for the formulas.
    ``keep``: the forward's dropout mask if it was kept (eager CPU), else it is drawn again from ``seed``."""
    K = x.shape[-1]
    W = weight_nk(weight, fan_in_fan_out)
    N = W.shape[0]
    dy2 = dy.reshape(-1, N)
    x2 = x.reshape(-1, K)
    cdt, acc = lora_A.dtype, norm.dtype
    c = magnitude.to(acc) / norm
    s = scale.to(acc)
    dx = dA = dB = dm = dbias = dW = None
    g = (dy2 * c).to(cdt)                                         # dY⊙c (formed in fp32), adapter dtype
    dS = (g @ lora_B) * s if (needs_dx or needs_dA) else None
    M = x2.shape[0]
    if ((needs_dB or needs_dm) and S.shape[0] != M) or (needs_dm and v.shape[0] != M):
        # not saved by the forward (dora_linear always saves what its gradients need): recompute them
        D = _dropped(x2, cdt, dropout_p, seed, keep)[0] if dropout_p > 0 else x2.to(cdt)
        S = D @ lora_A.t() if S.shape[0] != M else S
        v = (_times_w0t(D, W) if dropout_p > 0 else x2 @ W.t()) if v.shape[0] != M else v
        del D
    if needs_dB or needs_dm:
        T = dy2.to(cdt).t() @ S                                   # (N, r)
        if needs_dB:
            dB = (T.to(acc) * (c * s)[:, None]).to(cdt)
        if needs_dm:
            dv = (dy2 * v).sum(0) if dy2.dtype == v.dtype == acc else (dy2.to(acc) * v.to(acc)).sum(0)
            dm = ((dv + s * (lora_B.to(acc) * T.to(acc)).sum(1)) / norm).to(magnitude.dtype)
    if needs_dbias:
        dbias = dy2.sum(0, dtype=acc)
    if needs_dA or (needs_dx and dropout_p > 0) or (needs_dW and dropout_p > 0):
        if dropout_p > 0:
            D, keep = _dropped(x2, cdt, dropout_p, seed, keep)
        else:
            D = x2.to(cdt)
        if needs_dA:
            dA = dS.t() @ D
        if needs_dW and dropout_p > 0:
            h = (dy2 * (c - 1)).to(x.dtype)
            gw = dy2.t() @ x2 + (h.to(cdt).t() @ D).to(x.dtype)
            dW = weight_nk(gw, fan_in_fan_out).to(weight.dtype)
        del D
    if needs_dW and dropout_p == 0:
        gw = g.to(x.dtype).t() @ x2
        dW = weight_nk(gw, fan_in_fan_out).to(weight.dtype)
    if needs_dx:
        low = dS @ lora_A                                         # (M, K) adapter dtype
        if dropout_p > 0:
            inner = low.add_((dy2 * (c - 1)).to(x.dtype) @ W)     # the x̃·W0ᵀ term's gradient
            inner.mul_(keep).div_(1 - dropout_p)
            dx = torch.addmm(inner.to(x.dtype), dy2, W)
        else:
            dx = torch.addmm(low.to(x.dtype), g.to(x.dtype), W)
        dx = dx.reshape(x.shape)
    return dx, dA, dB, dm, dbias, dW


# ---------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------

def norm_forward(weight, lora_A, lora_B, scale, fan_in_fan_out, w2, backend):
    """(n, w2) on the selected backend (the Triton kernel, or the pure-torch row blocks)."""
    if select_backend(weight.device, backend) == "triton":
        from ..kernels.dora_norm import dora_norm
        return dora_norm(weight, lora_A, lora_B, scale, fan_in_fan_out, w2)
    return torch_norm(weight, lora_A, lora_B, scale, fan_in_fan_out, w2)


def _op_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                w2: Optional[Tensor], scale: Tensor, dropout_p: float, seed: Tensor, fan_in_fan_out: bool,
                save_v: bool, save_s: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, v, S, n, new w2 — (0,) when ``w2`` was given); the GEMMs are torch's on every backend, ``backend``
    chooses the norm's pass (see ``forward``)."""
    y, v, S, n, new_w2 = forward(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed,
                                 fan_in_fan_out, save_v, save_s, backend)
    return y, v, S, n, (new_w2 if new_w2 is not None else n.new_empty(0))


def _op_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed, fan_in_fan_out, save_v,
                     save_s, backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = math.prod(x.shape[:-1])
    vdt = lora_A.dtype if dropout_p > 0 else x.dtype
    acc = acc_dtype(x.dtype)
    return (x.new_empty(*x.shape[:-1], N), x.new_empty((M if save_v else 0, N), dtype=vdt),
            x.new_empty((M if save_s else 0, lora_A.shape[0]), dtype=lora_A.dtype), x.new_empty(N, dtype=acc),
            x.new_empty(N if w2 is None else 0, dtype=acc))


def _op_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 norm: Tensor, v: Tensor, S: Tensor, scale: Tensor, dropout_p: float, seed: Tensor,
                 fan_in_fan_out: bool, needs_dx: bool, needs_dA: bool, needs_dB: bool, needs_dm: bool,
                 needs_dbias: bool, needs_dW: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return torch_backward(dy, x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, dropout_p, seed,
                          fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dm, needs_dbias, needs_dW)


def _op_backward_fake(dy, x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, dropout_p, seed, fan_in_fan_out,
                      needs_dx, needs_dA, needs_dB, needs_dm, needs_dbias, needs_dW, backend):
    like = lambda t, need: torch.empty_like(t, memory_format=torch.contiguous_format) if need else None  # noqa: E731
    return (like(x, needs_dx), like(lora_A, needs_dA), like(lora_B, needs_dB), like(magnitude, needs_dm),
            x.new_empty(dy.shape[-1], dtype=norm.dtype) if needs_dbias else None, like(weight, needs_dW))


def _save(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed, fan_in_fan_out, save_v, save_s,
     backend) = inputs
    _, v, S, n, new_w2 = output
    ctx.mark_non_differentiable(v, S, n, new_w2)
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, n, v, S, scale, seed)
    ctx.dropout_p, ctx.fan_in_fan_out, ctx.backend = dropout_p, fan_in_fan_out, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, bwd, dy, _dv, _dS, _dn, _dw2):
    x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, seed = ctx.saved_tensors
    nx, nw, nb, na, nbb, nm = ctx.needs_input_grad[:6]
    dx, dA, dB, dm, dbias, dW = bwd(dy, x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, ctx.dropout_p, seed,
                                    ctx.fan_in_fan_out, nx, na, nbb, nm, nb, nw, ctx.backend)
    return (dx if nx else None, dW if nw else None, dbias.to(ctx.bias_dtype) if nb else None, dA if na else None,
            dB if nbb else None, dm if nm else None) + (None,) * 8


dora_linear_fwd, dora_linear_bwd = register_op("dora_linear", _op_forward, _op_forward_fake, _op_backward,
                                               _op_backward_fake, save=_save, grads=_grads)


class DoraFunction(torch.autograd.Function):
    """Eager-mode autograd for dora_linear: the custom ops' forward / backward without the dispatcher layers (less
    host time per call). On CPU with dropout the forward's mask (torch's generator; ``seed`` None: the default
    one) is kept bit-packed (1/32 of an fp32 x) for the backward; on a GPU it is drawn again from the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed, fan_in_fan_out, save_v,
                save_s, backend):
        keep = bits = None
        if dropout_p > 0 and x.device.type == "cpu":
            K = x.shape[-1]
            keep, bits = draw_packed(seed, math.prod(x.shape[:-1]), K, dropout_p, lora_A.dtype)
        y, v, S, n, new_w2 = forward(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, dropout_p, seed,
                                     fan_in_fan_out, save_v, save_s, backend, keep)
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, n, v, S, scale, seed, bits)
        ctx.dropout_p, ctx.fan_in_fan_out, ctx.backend = dropout_p, fan_in_fan_out, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        new_w2 = new_w2 if new_w2 is not None else n.new_empty(0)
        ctx.mark_non_differentiable(new_w2)
        return own_output(y), new_w2

    @staticmethod
    def backward(ctx, dy, _dw2):
        x, weight, lora_A, lora_B, magnitude, norm, v, S, scale, seed, bits = ctx.saved_tensors
        nx, nw, nb, na, nbb, nm = ctx.needs_input_grad[:6]
        keep = None if bits is None else unpack_mask(bits, x.shape[-1], lora_A.dtype)
        dx, dA, dB, dm, dbias, dW = torch_backward(dy, x, weight, lora_A, lora_B, magnitude, norm, v, S, scale,
                                                   ctx.dropout_p, seed, ctx.fan_in_fan_out, nx, na, nbb, nm, nb, nw,
                                                   keep)
        return (dx, dW, dbias.to(ctx.bias_dtype) if nb else None, dA, dB, dm) + (None,) * 8


# ---------------------------------------------------------------------------
# ‖W0‖² cache (W0 frozen) and the functional
# ---------------------------------------------------------------------------

_w2_cache: dict[int, tuple] = {}   # id(weight) -> (weakref to weight, key, w2)


def _w2_key(weight: Tensor, fan_in_fan_out: bool):
    return (weight._version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype,
            weight.device, fan_in_fan_out)


def _cached_w2(weight: Tensor, fan_in_fan_out: bool):
    entry = _w2_cache.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == _w2_key(weight, fan_in_fan_out):
        return entry[2]
    return None


def _store_w2(weight: Tensor, fan_in_fan_out: bool, w2: Tensor) -> None:
    i = id(weight)

    def drop(ref, i=i):
        if _w2_cache.get(i, (None,))[0] is ref:
            del _w2_cache[i]
    _w2_cache[i] = (weakref.ref(weight, drop), _w2_key(weight, fan_in_fan_out), w2)


def clear_norm_cache() -> None:
    """Forget every cached ‖W0‖². Needed only after writing a frozen W0 in place through ``.data`` (which skips
    its version counter) while keeping the same storage; in-place ops on W0 itself invalidate the cache."""
    _w2_cache.clear()


def check_magnitude(magnitude, x, N) -> None:
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude must have shape ({N},) (out_features), got "
                         f"({', '.join(str(d) for d in magnitude.shape)})")
    ok = (x.dtype,) + ((torch.float32,) if x.dtype in _HALF else ())
    if magnitude.dtype not in ok:
        raise TypeError(f"magnitude must have x's dtype {x.dtype}" + (" or float32" if x.dtype in _HALF else "")
                        + f", got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")


def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, fan_in_fan_out: bool = False, *,
                backend: str | None = None) -> Tensor:
    """‖W0 + s·B·A‖ per output row, (N,) float32 (float64 for float64), detached — without the N×K matrix."""
    sdt = acc_dtype(weight.dtype)
    scale = scaling.detach().reshape(()).to(weight.device, sdt) if isinstance(scaling, Tensor) else \
        _constant(float(scaling), sdt, weight.device)
    with torch.no_grad():
        n, _ = norm_forward(weight.detach(), lora_A.detach(), lora_B.detach(), scale, fan_in_fan_out, None,
                            resolve_backend_choice(backend))
    return n


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float | Tensor, dropout_p: float = 0.0, training: bool = True, fan_in_fan_out: bool = False,
                *, seed: int | Tensor | None = None, backend: str | None = None) -> Tensor:
    """DoRA linear: y = base(x) + (m/n − 1)·(x̃·W0ᵀ) + (m/n)·s·(x̃·Aᵀ)·Bᵀ, n = ‖W0 + s·B·A‖ per row, detached.

    Args as ``fastlora.lora_linear`` (x (..., K); weight (N, K), or (K, N) with fan_in_fan_out; bias (N,);
    lora_A (r, K); lora_B (N, r); scaling a float or 0-d tensor; dropout_p applied when ``training``; seed;
    backend), plus ``magnitude`` (N,): DoRA's m (PEFT's ``lora_magnitude_vector``), x's dtype or float32 on a
    half base. Differentiable in x, lora_A, lora_B, magnitude, bias (and weight, by plain matmuls, if it
    requires grad). The norm pass runs on the selected backend (Triton kernel or pure torch); the GEMMs are
    torch's. Returns (..., N) in x's dtype.
    """
    N, K, r = check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    check_magnitude(magnitude, x, N)
    be = resolve_backend_choice(backend)
    compiling = torch.compiler.is_compiling()
    # the mask is drawn by torch code (the GEMMs are torch's on every backend): on the CPU, eagerly, torch's
    # default generator draws it when no seed is given
    p, scale, seed_t = op_scalars(x, scaling, dropout_p, training, seed, scale_dtype=acc_dtype(x.dtype),
                                  host_rng=x.device.type == "cpu" and not compiling)
    cache = not compiling and not weight.requires_grad
    w2 = _cached_w2(weight, fan_in_fan_out) if cache else None
    grad = torch.is_grad_enabled()
    save_v = grad and magnitude.requires_grad
    save_s = grad and (lora_B.requires_grad or magnitude.requires_grad)
    needs_graph = grad and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, magnitude))
    if not needs_graph and not compiling:
        # eager inference: no graph to record, so the op's dispatcher and autograd layers are skipped
        with torch.no_grad():
            y, _, _, _, new_w2 = forward(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, p, seed_t,
                                         fan_in_fan_out, False, False, be)
    elif not compiling:
        y, new_w2 = DoraFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, p, seed_t,
                                       fan_in_fan_out, save_v, save_s, be)
    else:
        y, _, _, _, new_w2 = dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, w2, scale, p, seed_t,
                                             fan_in_fan_out, save_v, save_s, be)
    if cache and w2 is None and new_w2 is not None and new_w2.numel():
        _store_w2(weight, fan_in_fan_out, new_w2.detach())
    return y


__all__ = ["dora_linear", "dora_linear_reference", "weight_norm", "clear_norm_cache", "torch_norm", "forward",
           "torch_backward"]
