"""torch.library registration of the fused LoRA linear op.

Two custom ops, so that torch.compile(fullgraph=True) traces models that use
them without graph breaks, and autograd wires them together:

    fastlora::lora_linear_fwd(x, W, bias?, A, B, scale, p, seed, fan_in_fan_out, save_s, deterministic, backend)
        -> (y, S)            S = dropout(x)·Aᵀ in float32, saved for backward
    fastlora::lora_linear_bwd(dy, x, W, A, B, S, scale, p, seed, fan_in_fan_out, needs…, deterministic, backend)
        -> (dx, dA, dB, dbias, dW)   (empty tensors for what was not asked)

Saved for backward: x (already alive for the previous layer), S (M×r), the
0-d scale and seed tensors. Never a mask, never a dropped copy of x.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import select_backend


def _kernels():
    from . import kernels  # imported lazily: fastlora.kernels is Triton-only
    return kernels


def forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend):
    """The forward computation itself, on the selected backend. The custom op below wraps it; inference
    calls in eager mode (nothing to differentiate, not tracing) call it directly, skipping the op's
    dispatcher and autograd layers (fastlora.functional)."""
    if select_backend(x.device, backend) == "triton":
        return _kernels().lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s)
    return reference.torch_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed,
                                   fan_in_fan_out, save_s)


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    scale: Tensor, dropout_p: float, seed: Tensor, fan_in_fan_out: bool, save_s: bool,
                    deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    # deterministic only shapes the backward; it is an input here so setup_context can keep it.
    return forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out, save_s, backend)


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
    if select_backend(x.device, backend) == "triton":
        dx, dA, dB, dbias = _kernels().lora_bwd(dy, x, weight, lora_A, lora_B, S, scale, dropout_p, seed,
                                                fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias,
                                                deterministic)
    else:
        dx, dA, dB, dbias = reference.torch_backward(dy, x, weight, lora_A, lora_B, S, scale, dropout_p,
                                                     seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB,
                                                     needs_dbias)
    # A trainable base weight is not what LoRA is for, but if asked, answer correctly (plain matmul).
    dW = None
    if needs_dW:
        g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)   # (N, K)
        dW = (g.t() if fan_in_fan_out else g).to(weight.dtype)
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
