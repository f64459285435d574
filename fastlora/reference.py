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

from .dropout import keep_mask


def _weight_nk(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as (N, K): a transposed *view* for GPT-2 Conv1D weights stored as (K, N)."""
    return weight.t() if fan_in_fan_out else weight


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0,
                          fan_in_fan_out=False):
    """y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ with autograd; the mask is the kernels' mask for ``seed``."""
    K = x.shape[-1]
    d = x
    if dropout_p > 0:
        keep = keep_mask(seed, x.numel() // K, K, dropout_p, x.device).reshape(x.shape)
        d = x * keep / (1 - dropout_p)
    y = x @ _weight_nk(weight, fan_in_fan_out).t().to(x.dtype)
    if bias is not None:
        y = y + bias
    return y + scaling * ((d @ lora_A.t()) @ lora_B.t())


# ---------------------------------------------------------------------------
# pure-torch backend (same contract as fastlora.kernels.lora_fwd / lora_bwd, in kernels/linear_fwd.py and linear_bwd.py)
# ---------------------------------------------------------------------------

def torch_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, keep=None):
    """Returns (y of shape (..., N), S of shape (M, r) in float32 (float64 for float64 x), or (0, r) when not saved).
    ``keep``: the (M, K) keep-mask for ``seed`` if the caller already has it (else drawn here). ``weight`` may
    be in a half dtype under float32 x (the module docstring: the QLoRA recipe)."""
    K = x.shape[-1]
    w = _weight_nk(weight, fan_in_fan_out)
    x2 = x.reshape(-1, K)
    d = x2.to(lora_A.dtype)
    if dropout_p > 0:
        d = d * (keep_mask(seed, x2.shape[0], K, dropout_p, x.device) if keep is None else keep)
    S = d @ lora_A.t()                                   # (M, r), adapter dtype
    if dropout_p > 0:
        S = S * (1.0 / (1.0 - dropout_p))
    Ss = S * scale.to(S.dtype)                           # scale the (M, r) side: no (M, N) temp
    if w.dtype != x.dtype:                               # float32 x, half base (QLoRA recipe): base as bnb, in
        xb = x2.to(w.dtype)                              # W's dtype on x cast to it; the LoRA branch on x itself
        y = (Ss @ lora_B.t()).add_(torch.addmm(bias, xb, w.t()) if bias is not None else xb @ w.t())
        del xb
    else:
        y = torch.addmm(bias.to(x.dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        if lora_B.dtype == y.dtype:
            y.addmm_(Ss, lora_B.t())                     # fused: y += s·S·Bᵀ in place
        else:                                            # fp32 adapters on a half base, like PEFT
            y.add_((Ss @ lora_B.t()).to(y.dtype))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    S_saved = S.to(acc) if save_s else S.new_empty((0, S.shape[1]), dtype=acc)
    return y.reshape(*x.shape[:-1], w.shape[0]), S_saved


def torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB, needs_dbias, keep=None):
    """Returns (dx, dA, dB, dbias); entries not needed are None. ``keep``: the forward's mask, if kept."""
    K = x.shape[-1]
    w = _weight_nk(weight, fan_in_fan_out)
    dy2 = dy.reshape(-1, w.shape[0])
    x2 = x.reshape(-1, K)
    ad = lora_A.dtype
    dyl = dy2.to(ad)
    s = scale.to(ad)
    if dropout_p > 0 and keep is None:
        keep = keep_mask(seed, x2.shape[0], K, dropout_p, x.device)
    elif dropout_p == 0:
        keep = None
    inv_keep = 1.0 / (1.0 - dropout_p)
    dx = dA = dB = dbias = None
    dS = (dyl @ lora_B) * s                                # computed once, reused below
    if needs_dB:
        dB = (dyl.t() @ S.to(ad)) * s
    if needs_dbias:
        dbias = dy2.sum(0, dtype=torch.float64 if dy2.dtype == torch.float64 else torch.float32)
    if needs_dA:
        d = x2.to(ad) if keep is None else x2.to(ad) * keep
        dA = (dS.t() @ d) * (inv_keep if keep is not None else 1.0)
    if needs_dx:
        lora_dx = dS @ lora_A                              # (M, K)
        if keep is not None:
            lora_dx = lora_dx * keep * inv_keep
        if w.dtype != dy2.dtype:                           # the QLoRA recipe: dx's base term as bnb's, in W's dtype
            dx = lora_dx.to(dy2.dtype).add_(dy2.to(w.dtype) @ w).reshape(x.shape)
        else:
            dx = torch.addmm(lora_dx.to(dy2.dtype), dy2, w.to(dy2.dtype)).reshape(x.shape)
    return dx, dA, dB, dbias
