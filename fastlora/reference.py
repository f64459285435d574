"""The maths, in plain torch.

Two things live here and both are the readable statement of what the kernels do:

* ``lora_linear_reference`` — a differentiable one-liner used as the float64
  oracle in the tests (autograd derives its gradients independently of ours).
* ``torch_forward`` / ``torch_backward`` — the pure-torch *backend*: the same
  forward/backward contract as the Triton launchers in ``fastlora.kernels``,
  used on CPU when the Triton interpreter is off. Fused where torch allows
  (addmm with alpha/beta), no x-sized temporaries beyond what the maths needs.

Notation (loralib / PEFT): x (M, K) · W (N, K) · bias (N,) · A (r, K) · B (N, r)
s = scaling · D = dropout(x) = x ⊙ keep / (1 − p) · S = D·Aᵀ (M, r)

    y      = x·Wᵀ + bias + s · S·Bᵀ
    dS     = s · dY·B                      (M, r)
    dB     = s · dYᵀ·S                     (N, r)
    dx     = dY·W + (dS·A) ⊙ keep / (1 − p)
    dA     = dSᵀ·D                         (r, K)
    dbias  = Σ_m dY

A base weight in another dtype than x (only fastlora.qlora passes one: float32 activations into a
half-compute quantized layer, the usual QLoRA recipe) runs the base GEMM and bias in the weight's dtype on x
cast to it, as bitsandbytes computes, the LoRA branch in x's dtype on x itself, and y in x's dtype; dx's
base term is dY cast to the weight's dtype times W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import draw_keep, keep_mask


def _weight_nk(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as (N, K): a transposed *view* for GPT-2 Conv1D weights stored as (K, N)."""
    return weight.t() if fan_in_fan_out else weight


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0,
                          fan_in_fan_out=False, keep=None):
    """y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ with autograd. The mask: ``keep`` (a boolean tensor of x's
    shape, or (M, K)) if given, e.g. the CPU torch path's ``fastlora.dropout.torch_keep_mask``; else the Triton
    kernels' mask for ``seed``."""
    K = x.shape[-1]
    d = x
    if dropout_p > 0:
        if keep is None:
            keep = keep_mask(seed, x.numel() // K, K, dropout_p, x.device)
        d = x * keep.reshape(x.shape) / (1 - dropout_p)
    y = x @ _weight_nk(weight, fan_in_fan_out).t().to(x.dtype)
    if bias is not None:
        y = y + bias
    return y + scaling * ((d @ lora_A.t()) @ lora_B.t())


# ---------------------------------------------------------------------------
# pure-torch backend (same contract as fastlora.kernels.lora_fwd / lora_bwd, in kernels/linear_fwd.py and linear_bwd.py)
#
# Few ops per call (host time is what a small layer costs): F.linear for the GEMMs, no-op casts skipped, the scale
# and 1/(1 − p) applied to the (M, r) side, as a GEMM's alpha where they are Python floats. ``scale``: a 0-d tensor,
# or a Python float (eager CPU calls: an alpha, no tensor op). ``keep``: the (M, K) 1/0 mask in the adapter dtype;
# on the CPU torch's generator draws it (seed None: the default generator), elsewhere it is the kernels' Philox mask.
# ---------------------------------------------------------------------------

_ZEROS: dict = {}


def _scaled_mm(a, b, s):
    """s·(a @ b): with a float s one GEMM (alpha = s; beta = 0 ignores the cached 0-d input), else mm then mul_."""
    if not isinstance(s, float):
        return a.mm(b).mul_(s)
    z = _ZEROS.get((a.dtype, a.device))
    if z is None:
        with torch.inference_mode(False):
            z = _ZEROS[(a.dtype, a.device)] = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.addmm(z, a, b, beta=0, alpha=s)


def torch_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, keep=None):
    """Returns (y of shape (..., N), S = drop(x)·Aᵀ of shape (M, r) in float32 (float64 for float64 x), or None
    when not saved). ``keep``: the mask for this call if the caller drew it already (else drawn here); consumed:
    its buffer becomes x ⊙ keep (no (M, K) allocation). ``weight`` may be in a half dtype under float32 x (the
    module docstring: the QLoRA recipe)."""
    K = x.shape[-1]
    w = weight.t() if fan_in_fan_out else weight
    x2 = x.reshape(-1, K)
    ad = lora_A.dtype
    if dropout_p > 0:
        d = (draw_keep(seed, x2.shape[0], K, dropout_p, x.device, ad) if keep is None else keep).mul_(x2)
        S = _scaled_mm(d, lora_A.t(), 1.0 / (1.0 - dropout_p))     # (M, r), adapter dtype
    else:
        S = F.linear(x2 if x2.dtype == ad else x2.to(ad), lora_A)
    if w.dtype != x.dtype:                                   # float32 x, half base (QLoRA recipe): base as bnb, in
        xb = x2.to(w.dtype)                                  # W's dtype on x cast to it; the LoRA branch on x itself
        y = _scaled_mm(S, lora_B.t(), scale).add_(F.linear(xb, w, bias))
        del xb
    else:
        y = F.linear(x2, w, bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
        if lora_B.dtype != y.dtype:                          # fp32 adapters on a half base, like PEFT
            y.add_(_scaled_mm(S, lora_B.t(), scale).to(y.dtype))
        elif isinstance(scale, float):
            y.addmm_(S, lora_B.t(), alpha=scale)             # fused: y += s·S·Bᵀ in place, no (M, N) temp
        else:
            y.addmm_(S * scale, lora_B.t())
    if save_s:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        S = S if S.dtype == acc else S.to(acc)
    return y.view(*x.shape[:-1], w.shape[0]), (S if save_s else None)


def torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB, needs_dbias, keep=None):
    """Returns (dx, dA, dB, dbias); entries not needed are None. ``keep``: the forward's mask, if kept (else
    drawn again from ``seed``); consumed, as in torch_forward."""
    K = x.shape[-1]
    w = weight.t() if fan_in_fan_out else weight
    dy2 = dy.reshape(-1, w.shape[0])
    x2 = x.reshape(-1, K)
    ad = lora_A.dtype
    dyl = dy2 if dy2.dtype == ad else dy2.to(ad)
    if dropout_p > 0 and keep is None and (needs_dx or needs_dA):
        keep = draw_keep(seed, x2.shape[0], K, dropout_p, x.device, ad)
    dx = dA = dB = dbias = None
    # dS = s·dY·B, with 1/(1 − p) folded in where it goes to the (M, K) side (computed once, reused below)
    dS = _scaled_mm(dyl, lora_B, scale / (1.0 - dropout_p) if dropout_p > 0 else scale)
    if needs_dB:
        dB = _scaled_mm(dyl.t(), S if S.dtype == ad else S.to(ad), scale)
    if needs_dbias:
        dbias = dy2.sum(0, dtype=torch.float64 if dy2.dtype == torch.float64 else torch.float32)
    if needs_dx:
        lora_dx = dS.mm(lora_A)                              # (M, K) adapter dtype
        if dropout_p > 0:
            lora_dx.mul_(keep)
        dt = dy2.dtype
        if w.dtype != dt:                                    # the QLoRA recipe: dx's base term as bnb's, in W's dtype
            dx = (lora_dx if lora_dx.dtype == dt else lora_dx.to(dt)).add_(dy2.to(w.dtype) @ w).view(x.shape)
        else:
            dx = torch.addmm(lora_dx if lora_dx.dtype == dt else lora_dx.to(dt), dy2, w).view(x.shape)
    if needs_dA:                                             # after dx: keep's buffer becomes x ⊙ keep here
        d = keep.mul_(x2) if dropout_p > 0 else (x2 if x2.dtype == ad else x2.to(ad))
        dA = dS.t().mm(d)
    return dx, dA, dB, dbias
