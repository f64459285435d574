"""The LoRA linear op, top to bottom: the maths in torch, the backend dispatch, the registered op, the functional.

    y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ

1. The maths, in plain torch (the readable statement of what the kernels do):

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

A base weight in another dtype than x (only fastlora.ops.qlora passes one: float32 activations into a
half-compute quantized layer, the usual QLoRA recipe) runs the base GEMM and bias in the weight's dtype on x
cast to it, as bitsandbytes computes, the LoRA branch in x's dtype on x itself, and y in x's dtype; dx's
base term is dY cast to the weight's dtype times W.

2. Dispatch: ``forward`` / ``backward`` run one backend ("triton": kernels/linear_fwd.py, linear_bwd.py; "torch":
   the functions of section 1).

3. Registration (torch.library): two custom ops, so that torch.compile(fullgraph=True) traces models that use
them without graph breaks, and autograd wires them together:

    fastlora::lora_linear_fwd(x, W, bias?, A, B, scale, p, seed, fan_in_fan_out, save_s, deterministic, backend)
        -> (y, S)            S = dropout(x)·Aᵀ in float32, saved for backward
    fastlora::lora_linear_bwd(dy, x, W, A, B, S, scale, p, seed, fan_in_fan_out, needs…, deterministic, backend)
        -> (dx, dA, dB, dbias, dW)   (empty tensors for what was not asked)

Saved for backward: x (already alive for the previous layer), S (M×r), the
0-d scale and seed tensors. Never a mask, never a dropped copy of x: backward draws the mask again from the seed
(the kernels' Philox mask; on the CPU torch path a generator seeded with it, fastlora.core.dropout).

Eager training does not go through the custom ops: ``LoraFunction`` (a plain torch.autograd.Function) runs the
same forward and backward without the dispatcher's layers (less host time per call); on the CPU torch path it
keeps the forward's dropout mask bit-packed (1/32 of an fp32 x) instead of drawing it again in backward, so its
seed may be None there (the mask then comes from torch's default generator, as nn.Dropout's).

4. The functional: ``lora_linear`` checks its inputs (fastlora.core.checks) and picks the path: eager inference
   calls ``forward``, eager training ``LoraFunction``, torch.compile traces the custom op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.backend import select_backend
from ..core.checks import acc_dtype, check_inputs, op_scalars, weight_grad, weight_nk
from ..core.dropout import draw_keep, draw_packed, keep_mask, unpack_mask
from ..core.registration import register_op


# ---------------------------------------------------------------------------- 1. the maths in torch

def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0,
                          fan_in_fan_out=False, keep=None):
    """y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ with autograd. The mask: ``keep`` (a boolean tensor of x's
    shape, or (M, K)) if given, e.g. the CPU torch path's ``fastlora.core.dropout.torch_keep_mask``; else the Triton
    kernels' mask for ``seed``."""
    K = x.shape[-1]
    d = x
    if dropout_p > 0:
        if keep is None:
            keep = keep_mask(seed, x.numel() // K, K, dropout_p, x.device)
        d = x * keep.reshape(x.shape) / (1 - dropout_p)
    y = x @ weight_nk(weight, fan_in_fan_out).t().to(x.dtype)
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
    w = weight_nk(weight, fan_in_fan_out)
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
        acc = acc_dtype(x.dtype)
        S = S if S.dtype == acc else S.to(acc)
    return y.view(*x.shape[:-1], w.shape[0]), (S if save_s else None)


def torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB, needs_dbias, keep=None):
    """Returns (dx, dA, dB, dbias); entries not needed are None. ``keep``: the forward's mask, if kept (else
    drawn again from ``seed``); consumed, as in torch_forward."""
    K = x.shape[-1]
    w = weight_nk(weight, fan_in_fan_out)
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
        dbias = dy2.sum(0, dtype=acc_dtype(dy2.dtype))
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


# ---------------------------------------------------------------------------- 2-3. dispatch, registration

def _kernels():
    from ..kernels import linear_bwd, linear_fwd   # imported lazily: fastlora.kernels is Triton-only
    return linear_fwd, linear_bwd


def forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend, keep=None):
    """The forward computation itself, on the selected backend. The custom op below wraps it; eager calls
    (inference, and LoraFunction in training) call it directly, skipping the op's dispatcher layers
    (``lora_linear`` below). ``keep``: the dropout mask, when the torch backend's caller drew it already."""
    if backend != "torch" and select_backend(x.device, backend) == "triton":     # "torch": already selected
        return _kernels()[0].lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s)
    return torch_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s, keep)


def backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
             needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, deterministic, backend, keep=None):
    """(dx, dA, dB, dbias, dW) on the selected backend, None where not needed."""
    if backend != "torch" and select_backend(x.device, backend) == "triton":
        dx, dA, dB, dbias = _kernels()[1].lora_bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed,
                                                fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias,
                                                deterministic)
    else:
        dx, dA, dB, dbias = torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p,
                                                     seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB,
                                                     needs_dbias, keep)
    dW = weight_grad(dy, x, fan_in_fan_out, weight.dtype) if needs_dW else None
    return dx, dA, dB, dbias, dW


def _op_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: Tensor,
                dropout_p: float, seed: Tensor, fan_in_fan_out: bool, save_s: bool, deterministic: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    # deterministic only shapes the backward; it is an input here so that save() can keep it.
    y, S = forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend)
    return y, (S if S is not None else x.new_empty((0, lora_A.shape[0]), dtype=acc_dtype(x.dtype)))


def _op_forward_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, deterministic,
                     backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], N), x.new_empty((M if save_s else 0, lora_A.shape[0]), dtype=acc_dtype(x.dtype))


def _op_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, scale: Tensor,
                 dropout_p: float, seed: Tensor, fan_in_fan_out: bool, needs_dx: bool, needs_dA: bool,
                 needs_dB: bool, needs_dbias: bool, needs_dW: bool, deterministic: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out, needs_dx, needs_dA,
                    needs_dB, needs_dbias, needs_dW, deterministic, backend)


def _op_backward_fake(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out, needs_dx, needs_dA,
                      needs_dB, needs_dbias, needs_dW, deterministic, backend):
    like = lambda t, need: torch.empty_like(t, memory_format=torch.contiguous_format) if need else None  # noqa: E731
    return (like(x, needs_dx), like(lora_A, needs_dA), like(lora_B, needs_dB),
            x.new_empty(dy.shape[-1], dtype=S.dtype) if needs_dbias else None, like(weight, needs_dW))


def _save(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, deterministic, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scale, seed)
    ctx.cfg = (dropout_p, fan_in_fan_out, deterministic, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, bwd, dy, _dS):
    x, weight, lora_A, lora_B, S, scale, seed = ctx.saved_tensors
    dropout_p, fan_in_fan_out, deterministic, backend = ctx.cfg
    nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
    dx, dA, dB, dbias, dW = bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
                                nx, na, nbb, nb, nw, deterministic, backend)
    return (dx if nx else None, dW if nw else None, dbias.to(ctx.bias_dtype) if nb else None, dA if na else None,
            dB if nbb else None) + (None,) * 7


lora_linear_fwd, lora_linear_bwd = register_op("lora_linear", _op_forward, _op_forward_fake, _op_backward,
                                               _op_backward_fake, save=_save, grads=_grads)


def own_output(y: Tensor) -> Tensor:
    """The output an autograd Function returns: ``y`` itself, or, when ``y`` is a view of the op's own (M, N)
    result (the final reshape to x's leading dims), the same memory as an ordinary tensor (``detach``: not a
    view to autograd), so that users may modify it in place in training (autograd forbids in-place ops on a view
    a custom Function returns). Callers return no view of an input or of a saved tensor."""
    return y if y._base is None else y.detach()


class LoraFunction(torch.autograd.Function):
    """Eager-mode autograd for lora_linear: the custom ops' forward / backward without the dispatcher layers.
    ``cfg`` = (scale, p, seed, fan_in_fan_out, deterministic, backend), the backend already selected; on the CPU
    torch path scale may be a Python float and seed None (fastlora.core.checks.op_scalars). On the CPU torch path
    with dropout, the mask drawn in forward is saved bit-packed and reused in backward (elsewhere backward draws
    it again from the seed).

    ``weight``: the base weight, or a weight source: a callable returning it (QLoRA: bitsandbytes dequantizes the
    4-bit / 8-bit weight, fastlora.ops.qlora), called in forward and again in backward, never saved — so at most
    one layer's full-precision weight exists at a time. A source gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, cfg):
        scale, p, seed, fan_in_fan_out, _, backend = cfg
        keep = bits = None
        if p > 0 and backend == "torch" and x.device.type == "cpu":
            K = x.shape[-1]
            keep, bits = draw_packed(seed, x.numel() // K if K else 0, K, p, lora_A.dtype)
        source = None if isinstance(weight, Tensor) else weight
        w = weight if source is None else source()
        y, S = forward(x, w, bias, lora_A, lora_B, scale, p, seed, fan_in_fan_out, True, backend, keep)
        ctx.save_for_backward(x, w if source is None else None, lora_A, lora_B, S, bits)
        ctx.cfg, ctx.source = cfg, source   # scale and seed: 0-d tensors (or a float / None), not Function inputs
        ctx.bias_dtype = None if bias is None else bias.dtype
        return own_output(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, bits = ctx.saved_tensors
        scale, p, seed, fan_in_fan_out, deterministic, backend = ctx.cfg
        nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
        keep = None if bits is None else unpack_mask(bits, x.shape[-1], lora_A.dtype)
        w = weight if ctx.source is None else ctx.source()
        dx, dA, dB, dbias, dW = backward(dy, x, w, lora_A, lora_B, S, scale, p, seed, fan_in_fan_out,
                                         nx, na, nbb, nb, nw, deterministic, backend, keep)
        if nb:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dW, dbias, dA, dB, None


# ---------------------------------------------------------------------------- 4. the functional

def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float | Tensor, dropout_p: float = 0.0, training: bool = True,
                fan_in_fan_out: bool = False, *, seed: int | Tensor | None = None,
                backend: str | None = None, deterministic: bool | None = None) -> Tensor:
    """y = x·Wᵀ + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ, fused.

    Args:
        x: (..., K) float32/float16/bfloat16 (float64 too, for gradcheck and oracles), any strides.
        weight: frozen base weight, (N, K); (K, N) when ``fan_in_fan_out`` (GPT-2 Conv1D), read
            through strides, never copied. Same dtype as x.
        bias: (N,) or None; gets a gradient when it requires one.
        lora_A: (r, K); lora_B: (N, r). x's dtype, or float32 on a half base (PEFT's default).
        scaling: alpha/r (or alpha/sqrt(r)); a float or 0-d tensor, a runtime value (no recompiles).
        dropout_p: LoRA dropout on the adapter input, in [0, 1); applied only when ``training``.
        seed: dropout seed (int or 0-d int tensor): the same seed gives the same mask on the same
            backend and device. The Triton kernels draw a counter-based Philox mask of (seed, row, col),
            regenerated in backward, never stored; the CPU torch path draws u = torch.rand ≥ p from a
            generator seeded with it and keeps the mask bit-packed (1/32 of an fp32 x) in eager training.
            CPU and GPU masks differ for one seed (as PEFT's do). Default: torch's generator on x's
            device draws the seed (or, on the CPU torch path, the mask itself, as nn.Dropout), so
            torch.manual_seed makes runs repeatable.
        backend: "auto" (default), "triton" or "torch"; see fastlora.core.backend.
        deterministic: backward without atomics (split reductions), bitwise repeatable. Default:
            torch.are_deterministic_algorithms_enabled().

    Returns (..., N) in x's dtype; accumulation in float32, rounded once.
    """
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, seed, backend,
                        deterministic)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, seed=None,
                 backend=None, deterministic=None):
    """lora_linear without check_inputs, for callers whose tensors are known to fit: a module's own parameters
    (checked when it was built) or a patched layer's (checked at patch time), x checked by the caller. Host time
    per call is what a small layer costs, and every line counts there."""
    dev = x.device
    be = select_backend(dev, backend)                      # once per call: "torch" or "triton"
    compiling = torch.compiler.is_compiling()
    host = be == "torch" and dev.type == "cpu" and not compiling
    p, scale, seed_t = op_scalars(x, scaling, dropout_p, training, seed, host_rng=host, float_scale=host)
    save_s = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                          or weight.requires_grad or (bias is not None and bias.requires_grad))
    if deterministic is None:      # shapes the kernels' backward only (the torch path's is deterministic anyway)
        deterministic = not host and torch.are_deterministic_algorithms_enabled()
    if compiling:                                          # torch.compile traces the custom op
        y, _ = lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, p, seed_t, fan_in_fan_out,
                                   save_s, bool(deterministic), be)
        return y
    if not save_s:
        # inference in eager mode: no graph to record, so the op's dispatcher / autograd layers are skipped
        return forward(x, weight, bias, lora_A, lora_B, scale, p, seed_t, fan_in_fan_out, False, be)[0]
    # eager training: a plain autograd.Function over the same forward / backward (no dispatcher layers)
    return LoraFunction.apply(x, weight, bias, lora_A, lora_B,
                                  (scale, p, seed_t, fan_in_fan_out, bool(deterministic), be))
