"""torch.library registration of the fused LoRA linear op.

Two custom ops, so that torch.compile(fullgraph=True) traces models that use
them without graph breaks, and autograd wires them together:

    fastlora::lora_linear_fwd(x, W, bias?, A, B, scale, p, seed, fan_in_fan_out, save_s, deterministic, backend)
        -> (y, S)            S = dropout(x)·Aᵀ in float32, saved for backward
    fastlora::lora_linear_bwd(dy, x, W, A, B, S, scale, p, seed, fan_in_fan_out, needs…, deterministic, backend)
        -> (dx, dA, dB, dbias, dW)   (empty tensors for what was not asked)

Saved for backward: x (already alive for the previous layer), S (M×r), the
0-d scale and seed tensors. Never a mask, never a dropped copy of x: backward draws the mask again from the seed
(the kernels' Philox mask; on the CPU torch path a generator seeded with it, fastlora.dropout).

Eager training does not go through the custom ops: ``LoraFunction`` (a plain torch.autograd.Function) runs the
same forward and backward without the dispatcher's layers (less host time per call); on the CPU torch path it
keeps the forward's dropout mask bit-packed (1/32 of an fp32 x) instead of drawing it again in backward, so its
seed may be None there (the mask then comes from torch's default generator, as nn.Dropout's).
torch.compile traces the custom ops (fastlora.functional picks the path).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import select_backend
from .dropout import draw_packed, unpack_mask


def _kernels():
    from .kernels import linear_bwd, linear_fwd   # imported lazily: fastlora.kernels is Triton-only
    return linear_fwd, linear_bwd


def forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend, keep=None):
    """The forward computation itself, on the selected backend. The custom op below wraps it; eager calls
    (inference, and LoraFunction in training) call it directly, skipping the op's dispatcher layers
    (fastlora.functional). ``keep``: the dropout mask, when the torch backend's caller drew it already."""
    if backend != "torch" and select_backend(x.device, backend) == "triton":     # "torch": already selected
        return _kernels()[0].lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s)
    return reference.torch_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s, keep)


def backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
             needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, deterministic, backend, keep=None):
    """(dx, dA, dB, dbias, dW) on the selected backend, None where not needed."""
    if backend != "torch" and select_backend(x.device, backend) == "triton":
        dx, dA, dB, dbias = _kernels()[1].lora_bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed,
                                                fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias,
                                                deterministic)
    else:
        dx, dA, dB, dbias = reference.torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p,
                                                     seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB,
                                                     needs_dbias, keep)
    # A trainable base weight is not what LoRA is for, but if asked, answer correctly (plain matmul).
    dW = None
    if needs_dW:
        g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)   # (N, K)
        dW = (g.t() if fan_in_fan_out else g).to(weight.dtype)
    return dx, dA, dB, dbias, dW


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    scale: Tensor, dropout_p: float, seed: Tensor, fan_in_fan_out: bool, save_s: bool,
                    deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    # deterministic only shapes the backward; it is an input here so setup_context can keep it.
    y, S = forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend)
    return y, (S if S is not None else
               x.new_empty((0, lora_A.shape[0]), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, deterministic, backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], N)
    S = x.new_empty((M if save_s else 0, lora_A.shape[0]),
                    dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y, S


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                    scale: Tensor, dropout_p: float, seed: Tensor, fan_in_fan_out: bool,
                    needs_dx: bool, needs_dA: bool, needs_dB: bool, needs_dbias: bool, needs_dW: bool,
                    deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dA, dB, dbias, dW = backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out,
                                     needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, deterministic, backend)
    # a custom op's outputs may not alias each other: one fresh empty tensor per missing gradient
    return tuple(t.contiguous() if t is not None else x.new_empty(0) for t in (dx, dA, dB, dbias, dW))


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, fan_in_fan_out, needs_dx, needs_dA,
      needs_dB, needs_dbias, needs_dW, deterministic, backend):
    N = dy.shape[-1]
    e = lambda: x.new_empty(0)  # noqa: E731 — one fresh tensor per missing output (no aliasing)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else e(),
            torch.empty_like(lora_A, memory_format=torch.contiguous_format) if needs_dA else e(),
            torch.empty_like(lora_B, memory_format=torch.contiguous_format) if needs_dB else e(),
            x.new_empty(N, dtype=S.dtype) if needs_dbias else e(),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_dW else e())


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, deterministic, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scale, seed)
    ctx.dropout_p, ctx.fan_in_fan_out, ctx.backend = dropout_p, fan_in_fan_out, backend
    ctx.bias_meta = None if bias is None else (bias.dtype, bias.requires_grad)
    ctx.deterministic = deterministic


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, scale, seed = ctx.saved_tensors
    nx, nw, nb, na, nbb = (ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4))
    dx, dA, dB, dbias, dW = lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, S, scale, ctx.dropout_p, seed, ctx.fan_in_fan_out,
        nx, na, nbb, nb, nw, ctx.deterministic, ctx.backend)
    if nb:
        dbias = dbias.to(ctx.bias_meta[0])
    return (dx if nx else None, dW if nw else None, dbias if nb else None, dA if na else None,
            dB if nbb else None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastlora::lora_linear_fwd", _backward, setup_context=_setup_context)


def own_output(y: Tensor) -> Tensor:
    """The output an autograd Function returns: ``y`` itself, or, when ``y`` is a view of the op's own (M, N)
    result (the final reshape to x's leading dims), the same memory as an ordinary tensor (``detach``: not a
    view to autograd), so that users may modify it in place in training (autograd forbids in-place ops on a view
    a custom Function returns). Callers return no view of an input or of a saved tensor."""
    return y if y._base is None else y.detach()


class LoraFunction(torch.autograd.Function):
    """Eager-mode autograd for lora_linear: the custom ops' forward / backward without the dispatcher layers.
    ``cfg`` = (scale, p, seed, fan_in_fan_out, deterministic, backend), the backend already selected; on the CPU
    torch path scale may be a Python float and seed None (fastlora.functional.op_scalars). On the CPU torch path
    with dropout, the mask drawn in forward is saved bit-packed and reused in backward (elsewhere backward draws
    it again from the seed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, cfg):
        scale, p, seed, fan_in_fan_out, _, backend = cfg
        keep = bits = None
        if p > 0 and backend == "torch" and x.device.type == "cpu":
            K = x.shape[-1]
            keep, bits = draw_packed(seed, x.numel() // K if K else 0, K, p, lora_A.dtype)
        y, S = forward(x, weight, bias, lora_A, lora_B, scale, p, seed, fan_in_fan_out, True, backend, keep)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S, bits)
        ctx.cfg = cfg                  # scale and seed: 0-d tensors (or a float / None), not inputs of the Function
        ctx.bias_dtype = None if bias is None else bias.dtype
        return own_output(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, bits = ctx.saved_tensors
        scale, p, seed, fan_in_fan_out, deterministic, backend = ctx.cfg
        nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
        keep = None if bits is None else unpack_mask(bits, x.shape[-1], lora_A.dtype)
        dx, dA, dB, dbias, dW = backward(dy, x, weight, lora_A, lora_B, S, scale, p, seed, fan_in_fan_out,
                                         nx, na, nbb, nb, nw, deterministic, backend, keep)
        if nb:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dW, dbias, dA, dB, None
