"""Batched multi-adapter LoRA: every token (or sequence) of a batch uses its own adapter of a bank.

    y[m] = x[m]·W0ᵀ + bias + s_k·(drop(x)[m]·A_kᵀ)·B_kᵀ        k = ids[m] (−1: base model only)

Layers, top to bottom (the module and the PEFT wrapper live above this file):
    fastlora.integrations.multi_peft.MultiAdapterModel(peft_model)  a PEFT model's adapters, mixed batches
    fastlora.nn.multi.MultiLoraLinear(base_layer, bank)             the module (adapter names per call: using_adapters)
    multi_lora_linear(x, weight, bias, bank, adapter_ids | plan=, …)   this file: validated functional, differentiable
    plan_batch(bank, adapter_ids, x) -> BatchPlan                     the batch plan, once per model forward
                                                                    (fastlora.ops.multi_plan), shared by layers
    _forward / MultiLoraFunction / fastlora::multi_lora_fwd, _bwd     eager inference / eager training /
                                                                    registered ops (torch.compile)
      -> "triton": fastlora.kernels.multi_lora (gather kernels; CUDA, or CPU with TRITON_INTERPRET=1)
      -> "torch":  fastlora.ops.multi_reference.multi_torch_forward / _backward (CPU otherwise; the readable maths)

Shapes: x (..., K); ids int32/int64 of shape x.shape[:-1] (per token) or x.shape[:1] (per sequence, x at
least 3-D); bank tensors: A (R_tot, K), B (N, R_tot), offsets (n+1,) int32, scalings (n,) float32 — see
fastlora.ops.bank. S (M, r_max) float32 is saved for backward (S[m, :r_k] = drop(x)[m]·A_kᵀ). Per-adapter dropout
p is a cached (n, 2) device table (one launch whatever the p's). The launch path reads no device value on
the host: ids are range-checked with torch._assert_async (immediate on CPU, asynchronous on CUDA) and the plan
is built with fixed-size device ops, so a fixed bank is CUDA-graph capturable (``BatchPlan.update_`` refills a
captured plan). Only the CPU torch path reads the plan on the host (once per plan), where that costs nothing.

The pure-torch path (dense masking, or per-adapter segments on CPU) is described in fastlora.ops.multi_reference.
Adapter names given per call (MultiAdapterModel, ``using_adapters``) live in a ContextVar, not on the layers.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..core.backend import resolve_backend_choice, select_backend
from ..core.checks import _constant, cached_tensor, check_inputs, weight_grad
from ..core.dropout import new_seed
from ..core.registration import register_op
from .bank import AdapterBank
from .lora import own_output
from .multi_plan import BatchPlan, choose_regime, plan_batch
from .multi_reference import multi_torch_backward, multi_torch_forward


def _kernels():
    from ..kernels import multi_lora   # lazily: Triton-only module
    return multi_lora


# ---------------------------------------------------------------------------
# the op on the selected backend: eager inference calls _forward directly, eager training goes through
# MultiLoraFunction, torch.compile traces the custom ops (which carry the plan as its one int32 tensor)
# ---------------------------------------------------------------------------

def _forward(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk, dropout, seed, fan_in_fan_out,
             save_s, backend):
    """(y, S) on the selected backend. plan: a BatchPlan; pk: float32 (n, 2) (p_k, 1/(1−p_k)) read when dropout."""
    if select_backend(x.device, backend) == "triton":
        return _kernels().multi_lora_fwd(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk,
                                         dropout, seed, fan_in_fan_out, save_s)
    return multi_torch_forward(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk, dropout, seed,
                               fan_in_fan_out, save_s)


def _backward(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, S, r_max, pk, dropout, seed, fan_in_fan_out,
              needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, backend):
    """(dx, dA, dB, dbias (float32), dW), None where not needed."""
    if select_backend(x.device, backend) == "triton":
        dx, dA, dB = _kernels().multi_lora_bwd(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, S, r_max, pk,
                                               dropout, seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB)
    else:
        dx, dA, dB = multi_torch_backward(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, S, pk, dropout,
                                          seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB)
    dy2 = dy.reshape(-1, dy.shape[-1])
    dbias = dy2.sum(0, dtype=torch.float32) if needs_dbias else None
    dW = weight_grad(dy, x, fan_in_fan_out, weight.dtype) if needs_dW else None
    return dx, dA, dB, dbias, dW


class MultiLoraFunction(torch.autograd.Function):
    """Eager training: the same maths as the custom ops, with the BatchPlan object itself kept for backward (so
    the CPU path's host reads of the plan stay shared by every layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk, dropout, seed,
                fan_in_fan_out, backend):
        y, S = _forward(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk, dropout, seed,
                        fan_in_fan_out, True, backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, offsets, scalings, S, pk, seed)
        ctx.plan, ctx.meta = plan, (r_max, dropout, fan_in_fan_out, backend)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return own_output(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, offsets, scalings, S, pk, seed = ctx.saved_tensors
        r_max, dropout, fifo, backend = ctx.meta
        nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
        dx, dA, dB, dbias, dW = _backward(dy.contiguous(), x, weight, lora_A, lora_B, offsets, scalings, ctx.plan, S,
                                          r_max, pk, dropout, seed, fifo, nx, na, nbb, nb, nw, backend)
        return (dx, dW, dbias.to(ctx.bias_dtype) if nb else None, dA, dB) + (None,) * 9


# ---------------------------------------------------------------------------
# custom ops (torch.compile): the plan travels as its int32 tensor, rebuilt as a BatchPlan view inside
# ---------------------------------------------------------------------------

def _plan_view(plan_data, x, offsets, regime):
    return BatchPlan(plan_data, x.shape[:-1], offsets.numel() - 1, regime)


def _op_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, offsets: Tensor,
                scalings: Tensor, plan: Tensor, regime: str, r_max: int, pk: Tensor, dropout: bool, seed: Tensor,
                fan_in_fan_out: bool, save_s: bool, backend: str) -> tuple[Tensor, Tensor]:
    y, S = _forward(x, weight, bias, lora_A, lora_B, offsets, scalings, _plan_view(plan, x, offsets, regime), r_max,
                    pk, dropout, seed, fan_in_fan_out, save_s, backend)
    return y, S.contiguous()


def _op_forward_fake(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, regime, r_max, pk, dropout, seed,
                     fan_in_fan_out, save_s, backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], N), x.new_empty((M if save_s else 0, r_max), dtype=torch.float32)


def _op_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, offsets: Tensor,
                 scalings: Tensor, plan: Tensor, regime: str, S: Tensor, r_max: int, pk: Tensor, dropout: bool,
                 seed: Tensor, fan_in_fan_out: bool, needs_dx: bool, needs_dA: bool, needs_dB: bool,
                 needs_dbias: bool, needs_dW: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, lora_A, lora_B, offsets, scalings, _plan_view(plan, x, offsets, regime), S,
                     r_max, pk, dropout, seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW,
                     backend)


def _op_backward_fake(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, regime, S, r_max, pk, dropout, seed,
                      fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, backend):
    like = lambda t, need: torch.empty_like(t, memory_format=torch.contiguous_format) if need else None  # noqa: E731
    return (like(x, needs_dx), like(lora_A, needs_dA), like(lora_B, needs_dB),
            x.new_empty(dy.shape[-1], dtype=torch.float32) if needs_dbias else None, like(weight, needs_dW))


def _save(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, offsets, scalings, plan, regime, r_max, pk, dropout, seed, fan_in_fan_out,
     save_s, backend) = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, offsets, scalings, plan, output[1], pk, seed)
    ctx.meta = (regime, r_max, dropout, fan_in_fan_out, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, bwd, dy, _dS):
    x, weight, lora_A, lora_B, offsets, scalings, plan, S, pk, seed = ctx.saved_tensors
    regime, r_max, dropout, fifo, backend = ctx.meta
    nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
    dx, dA, dB, dbias, dW = bwd(dy.contiguous(), x, weight, lora_A, lora_B, offsets, scalings, plan, regime, S, r_max,
                                pk, dropout, seed, fifo, nx, na, nbb, nb, nw, backend)
    return (dx if nx else None, dW if nw else None, dbias.to(ctx.bias_dtype) if nb else None,
            dA if na else None, dB if nbb else None) + (None,) * 11


multi_lora_fwd, multi_lora_bwd = register_op("multi_lora", _op_forward, _op_forward_fake, _op_backward,
                                             _op_backward_fake, save=_save, grads=_grads)


# ---------------------------------------------------------------------------
# validated functional
# ---------------------------------------------------------------------------

def _per_adapter_p(dropout_p, n: int) -> list[float] | float:
    """dropout_p as given: one float for every adapter, or a sequence of n floats (one per adapter)."""
    if isinstance(dropout_p, (numbers.Real, Tensor)) and not isinstance(dropout_p, bool):
        return dropout_p
    if not isinstance(dropout_p, Sequence) or isinstance(dropout_p, str) or len(dropout_p) != n:
        raise ValueError(f"dropout_p must be a float in [0, 1) or a sequence of {n} such floats (one per adapter of "
                         f"the bank, in bank order), got {dropout_p!r}")
    for q in dropout_p:
        if not isinstance(q, numbers.Real) or isinstance(q, bool) or not 0.0 <= q < 1.0:
            raise ValueError(f"dropout_p must hold floats in [0, 1) (one per adapter), got {q!r} in {list(dropout_p)}")
    return [float(q) for q in dropout_p]


def _dropout_table(ps: tuple, device) -> Tensor:
    """float32 (n, 2) of (p_k, 1/(1−p_k)) on ``device``, cached per (ps, device) (functional.cached_tensor)."""
    return cached_tensor(("multi_dropout", ps, torch.device(device)), lambda: torch.tensor(
        [[q, 1.0 / (1.0 - q)] for q in ps] or [[0.0, 1.0]], dtype=torch.float32, device=device))


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, bank: AdapterBank,
                      adapter_ids: Tensor | Sequence[str | None] | None = None,
                      dropout_p: float | Sequence[float] = 0.0, training: bool = True, fan_in_fan_out: bool = False,
                      *, plan: BatchPlan | None = None, seed: int | Tensor | None = None, regime: str = "auto",
                      backend: str | None = None) -> Tensor:
    """y = x·Wᵀ + bias + s_k·(dropout_k(x)·A_kᵀ)·B_kᵀ, k = the token's adapter (−1: none). Differentiable in
    x, bias and the bank's trainable adapters (each its own Parameters; every one in the batch trains at once;
    frozen ones get no gradient, and none is computed for a bank with no trainable adapter).

    x (..., K) · weight (N, K) or (K, N) with fan_in_fan_out · bias (N,) or None · the batch's adapters as
    EITHER ``adapter_ids`` (see fastlora.ops.multi_plan.expand_ids; a list of names per sequence also works) OR a
    ``plan`` from ``plan_batch`` (built once, shared by every layer whose bank holds the same adapters).
    The bank's dtype is x's or float32. Dropout is the single-adapter op's mask for the call's seed (the
    kernels' (seed, row, col) mask; on the CPU torch path u = torch.rand from a generator seeded with it) with
    one p for every adapter, or ``dropout_p`` = one p per adapter (bank order, as PEFT's per-adapter
    lora_dropout): token m of adapter k keeps column c iff u(m, c) ≥ p_k, one seed for the whole call, one
    launch for every p. ``regime`` applies when the plan is built here from ``adapter_ids``.
    """
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"bank must be a fastlora AdapterBank, got {type(bank).__name__}")
    ps = _per_adapter_p(dropout_p, len(bank))
    if bank.r_max:
        A0, B0 = bank.lora_A[:1], bank.lora_B[:, :1]
    else:   # an empty bank: validate x / weight / bias with a dummy rank-1 adapter
        A0 = x.new_zeros((1, bank.in_features), dtype=bank.dtype)
        B0 = x.new_zeros((bank.out_features, 1), dtype=bank.dtype)
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and bank.lora_A.device != x.device:
        raise ValueError(f"bank must be on x's device {x.device}, got {bank.lora_A.device}")
    check_inputs(x, weight, bias, A0, B0, 1.0, max(ps, default=0.0) if isinstance(ps, list) else ps,
                 fan_in_fan_out)
    if (plan is None) == (adapter_ids is None):
        raise ValueError("give the batch's adapters as exactly one of adapter_ids= (ids or names) and plan= "
                         "(from fastlora.plan_batch)")
    if plan is None:
        plan = plan_batch(bank, adapter_ids, x, regime=regime)
    elif not isinstance(plan, BatchPlan):
        raise TypeError(f"plan must be a fastlora BatchPlan (from fastlora.plan_batch), got {type(plan).__name__}")
    else:
        choose_regime(1, 1, regime)                                  # validates the name
        plan.check(x, bank.names)
    ps_t = tuple(ps) if isinstance(ps, list) else (float(ps),) * len(bank)
    dropout = training and any(q > 0 for q in ps_t)
    pk = _dropout_table(ps_t if dropout else (), x.device)
    if dropout:
        seed_t = new_seed(x.device) if seed is None else torch.as_tensor(seed, dtype=torch.int64, device=x.device)
    else:
        seed_t = _constant(0, torch.int64, x.device)
    lora_A, lora_B = bank.packed()      # with grad: views whose gradients reach the trainable adapters only
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))
    args = (x, weight, bias, lora_A, lora_B, bank.offsets, bank.scalings)
    be = resolve_backend_choice(backend)
    if torch.compiler.is_compiling():
        y, _ = multi_lora_fwd(*args, plan.data, plan.regime, bank.r_max, pk, dropout, seed_t, fan_in_fan_out, grad, be)
        return y
    if grad:
        return MultiLoraFunction.apply(*args, plan, bank.r_max, pk, dropout, seed_t, fan_in_fan_out, be)
    return _forward(*args, plan, bank.r_max, pk, dropout, seed_t, fan_in_fan_out, False, be)[0]


__all__ = ["multi_lora_linear", "MultiLoraFunction", "multi_lora_fwd", "multi_lora_bwd"]
