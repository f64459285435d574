"""Batched multi-adapter LoRA: every token (or sequence) of a batch uses its own adapter of a bank.

    y[m] = x[m]·W0ᵀ + bias + s_k·(drop(x)[m]·A_kᵀ)·B_kᵀ        k = ids[m] (−1: base model only)

Layers, top to bottom:
    MultiLoraLinear(base_layer, bank).forward(x, adapter_ids | plan=)  the module
    multi_lora_linear(x, weight, bias, bank, adapter_ids | plan=, …)   validated functional, differentiable
    plan_batch(bank, adapter_ids, x) -> BatchPlan                     the batch plan, once per model forward
                                                                    (fastlora.multi_plan), shared by layers
    _forward / MultiLoraFunction / fastlora::multi_lora_fwd, _bwd     eager inference / eager training /
                                                                    torch.library custom ops (torch.compile)
      -> "triton": fastlora.kernels.multi_lora (gather kernels; CUDA, or CPU with TRITON_INTERPRET=1)
      -> "torch":  fastlora.multi_reference.multi_torch_forward / _backward (CPU otherwise; the readable maths)
    fastlora.multi_peft.MultiAdapterModel(peft_model)               runs a PEFT model with several loaded
                                                                    adapters in mixed batches through it

Shapes: x (..., K); ids int32/int64 of shape x.shape[:-1] (per token) or x.shape[:1] (per sequence, x at
least 3-D); bank tensors: A (R_tot, K), B (N, R_tot), offsets (n+1,) int32, scalings (n,) float32 — see
fastlora.bank. S (M, r_max) float32 is saved for backward (S[m, :r_k] = drop(x)[m]·A_kᵀ). Per-adapter dropout
p is a cached (n, 2) device table (one launch whatever the p's). The launch path reads no device value on
the host: ids are range-checked with torch._assert_async (immediate on CPU, asynchronous on CUDA) and the plan
is built with fixed-size device ops, so a fixed bank is CUDA-graph capturable (``BatchPlan.update_`` refills a
captured plan). Only the CPU torch path reads the plan on the host (once per plan), where that costs nothing.

The pure-torch path (dense masking, or per-adapter segments on CPU) is described in fastlora.multi_reference.
Adapter names given per call (MultiAdapterModel, ``using_adapters``) live in a ContextVar, not on the layers.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from . import tracing as _tracing
from .backend import resolve_backend_choice, select_backend
from .bank import BASE, AdapterBank
from .dropout import new_seed
from .functional import _constant, cached_tensor
from .multi_plan import BatchPlan, choose_regime, expand_ids, plan_batch
from .multi_reference import multi_torch_backward, multi_torch_forward
from .ops import own_output
from .tracing import ACTIVE as _TRACING


def _kernels():
    from .kernels import multi_lora   # lazily: Triton-only module
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
    dW = None
    if needs_dW:   # a trainable base weight is not what LoRA is for, but answer correctly
        g = dy2.t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)
        dW = (g.t() if fan_in_fan_out else g).to(weight.dtype)
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


@torch.library.custom_op("fastlora::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   offsets: Tensor, scalings: Tensor, plan: Tensor, regime: str, r_max: int, pk: Tensor,
                   dropout: bool, seed: Tensor, fan_in_fan_out: bool, save_s: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    y, S = _forward(x, weight, bias, lora_A, lora_B, offsets, scalings, _plan_view(plan, x, offsets, regime), r_max,
                    pk, dropout, seed, fan_in_fan_out, save_s, backend)
    return y, S.contiguous()


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, regime, r_max, pk, dropout, seed, fan_in_fan_out,
      save_s, backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], N), x.new_empty((M if save_s else 0, r_max), dtype=torch.float32)


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, offsets: Tensor,
                   scalings: Tensor, plan: Tensor, regime: str, S: Tensor, r_max: int, pk: Tensor, dropout: bool,
                   seed: Tensor, fan_in_fan_out: bool, needs_dx: bool, needs_dA: bool, needs_dB: bool,
                   needs_dbias: bool, needs_dW: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _backward(dy, x, weight, lora_A, lora_B, offsets, scalings, _plan_view(plan, x, offsets, regime), S, r_max,
                    pk, dropout, seed, fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, backend)
    return tuple(t.contiguous() if t is not None else x.new_empty(0) for t in out)


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, regime, S, r_max, pk, dropout, seed, fan_in_fan_out,
      needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW, backend):
    like = lambda t, need: (torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
                            if need else x.new_empty(0))
    return (like(x, needs_dx), like(lora_A, needs_dA), like(lora_B, needs_dB),
            x.new_empty(dy.shape[-1], dtype=torch.float32) if needs_dbias else x.new_empty(0), like(weight, needs_dW))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, offsets, scalings, plan, regime, r_max, pk, dropout, seed, fan_in_fan_out,
     save_s, backend) = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, offsets, scalings, plan, output[1], pk, seed)
    ctx.meta = (regime, r_max, dropout, fan_in_fan_out, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _op_backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, offsets, scalings, plan, S, pk, seed = ctx.saved_tensors
    regime, r_max, dropout, fifo, backend = ctx.meta
    nx, nw, nb, na, nbb = (ctx.needs_input_grad[i] for i in range(5))
    dx, dA, dB, dbias, dW = multi_lora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, offsets, scalings, plan,
                                           regime, S, r_max, pk, dropout, seed, fifo, nx, na, nbb, nb, nw, backend)
    return (dx if nx else None, dW if nw else None, dbias.to(ctx.bias_dtype) if nb else None,
            dA if na else None, dB if nbb else None) + (None,) * 11


torch.library.register_autograd("fastlora::multi_lora_fwd", _op_backward, setup_context=_setup_context)


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
    EITHER ``adapter_ids`` (see fastlora.multi_plan.expand_ids; a list of names per sequence also works) OR a
    ``plan`` from ``plan_batch`` (built once, shared by every layer whose bank holds the same adapters).
    The bank's dtype is x's or float32. Dropout is the single-adapter op's mask for the call's seed (the
    kernels' (seed, row, col) mask; on the CPU torch path u = torch.rand from a generator seeded with it) with
    one p for every adapter, or ``dropout_p`` = one p per adapter (bank order, as PEFT's per-adapter
    lora_dropout): token m of adapter k keeps column c iff u(m, c) ≥ p_k, one seed for the whole call, one
    launch for every p. ``regime`` applies when the plan is built here from ``adapter_ids``.
    """
    from .functional import check_inputs
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


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------

class AdapterCall:
    """The adapters of one model call, read by every MultiLoraLinear of that call: ``names`` (one per sequence),
    or ``ids`` (an int tensor on the device, per sequence or per token) indexing the name list ``index``.

    The batch plan is built lazily, once per distinct bank layout (names in bank order), token shape, device
    and regime: layers whose banks hold the same adapters in the same order (all of MultiAdapterModel's, as a
    rule) share one plan per call. With ``ids`` nothing is copied from the host once the per-layout lookup
    table exists (the first call makes it), so such a call can be captured in a CUDA graph.
    """

    def __init__(self, names: Sequence[str | None] | None = None, *, ids: Tensor | None = None,
                 index: Sequence[str] | None = None):
        if (names is None) == (ids is None):
            raise ValueError("an AdapterCall takes adapter names or adapter ids, exactly one of them")
        self.names = _names_list(names, "adapter_names") if names is not None else None
        self.ids, self.index = ids, (tuple(index) if index is not None else None)
        if ids is not None:
            if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter_ids must be an int32/int64 tensor, got "
                                f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
            if ids.numel():
                msg = f"adapter_ids must be in [-1, {len(self.index)}) (indices into {list(self.index)}; -1 = base)"
                try:
                    torch._assert_async(((ids >= -1) & (ids < len(self.index))).all(), msg)
                except RuntimeError as e:
                    raise ValueError(msg) from e
        self._plans: dict = {}

    def plan_for(self, bank: AdapterBank, x: Tensor, regime: str = "auto") -> BatchPlan:
        key = (tuple(bank.names), x.device, tuple(x.shape[:-1]), regime)
        plan = self._plans.get(key)
        if plan is None:
            if self.ids is None:
                if x.dim() >= 2 and len(self.names) != x.shape[0]:
                    raise ValueError(f"adapter_names must hold one adapter name per sequence: got {len(self.names)} "
                                     f"name(s) for a batch of {x.shape[0]} (x of shape {tuple(x.shape)})")
                ids = bank.ids(self.names, device=x.device, missing="base")
            else:   # model-wide index -> this bank's index (-1 where the bank lacks the adapter), on the device
                table = _lookup(self.index, key[0], self.ids.device)
                ids = torch.where(self.ids >= 0, table[self.ids.clamp(min=0).long()], -1).to(torch.int32)
            plan = self._plans[key] = plan_batch(bank, ids, x, regime=regime)
        return plan


def _lookup(index: tuple, bank_names: tuple, device) -> Tensor:
    """int32 (len(index),): position in ``bank_names`` of each name of ``index`` (−1 if absent); cached per
    (index, bank layout, device) (functional.cached_tensor), made by the first call, before any graph capture."""
    pos = {n: i for i, n in enumerate(bank_names)}
    return cached_tensor(("multi_lookup", index, bank_names, torch.device(device)), lambda: torch.tensor(
        [pos.get(n, -1) for n in index] or [-1], dtype=torch.int32, device=device))


_CALL: contextvars.ContextVar[AdapterCall | None] = contextvars.ContextVar("fastlora_adapter_call", default=None)
# While torch.compile traces a call (Dynamo cannot read a ContextVar), the call lives on this stack instead: the
# trace pushes and pops it inside the traced frame, so the compiled graph keeps no state between calls.
_TRACED: list[AdapterCall] = []


def current_adapter_call() -> AdapterCall | None:
    """The AdapterCall of the innermost ``using_adapters`` block of this context (None outside any)."""
    if torch.compiler.is_compiling() and _TRACED:
        return _TRACED[-1]
    return _CALL.get()          # under torch.compile of an inner module: a graph break, read eagerly


def _names_list(names, what: str) -> list:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list with one adapter name per sequence, got the single str {names!r}; "
                        f"for one adapter on every sequence pass [{names!r}] * batch_size (as PEFT)")
    if not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a list with one adapter name per sequence, got {type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold adapter names (str, or None / {BASE!r} for the base model), got {bad[0]!r}")
    return list(names)


@contextlib.contextmanager
def using_adapters(names: Sequence[str | None] | AdapterCall) -> Iterator[AdapterCall]:
    """Every MultiLoraLinear called without ``adapter_ids`` inside this block uses ``names`` (one per sequence).

    The names live in a ``contextvars.ContextVar`` for the duration of the block, not on the modules: nested
    blocks and calls from other threads each see their own names, and leaving the block (also by an
    exception) restores what was there before. MultiAdapterModel.forward / generate use it.
    """
    token = _CALL.set(names if isinstance(names, AdapterCall) else AdapterCall(names))
    try:
        yield _CALL.get()
    finally:
        _CALL.reset(token)


@contextlib.contextmanager
def _entered(call: AdapterCall | None):
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)


def keep_adapters_for_recompute(checkpoint_func):
    """Wrap an activation-checkpointing function (``checkpoint_func(function, *args, **kwargs)``, as transformers'
    ``_gradient_checkpointing_func``) so that the checkpointed function runs — also when backward recomputes it,
    outside any ``using_adapters`` block — with the adapter names of the call that first ran it."""
    if getattr(checkpoint_func, "_fastlora_keeps_adapters", False):
        return checkpoint_func

    def wrapped(function, *args, **kwargs):
        call = _CALL.get()

        def run(*a, **k):
            with _entered(call):
                return function(*a, **k)
        return checkpoint_func(run, *args, **kwargs)

    wrapped._fastlora_keeps_adapters = True
    wrapped.__wrapped__ = checkpoint_func
    return wrapped


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus an AdapterBank; ``forward(x, adapter_ids)`` picks adapters per token.

    base_layer: nn.Linear (weight (N, K)) or a transformers Conv1D (weight (K, N), read through strides).
    dropout_p: one p for every adapter, or a mapping adapter name -> p (names not in it: 0), as PEFT's
    per-adapter lora_dropout.
    adapter_ids: int tensor of shape x.shape[:-1] or x.shape[:1] (see expand_ids), or a list of adapter
    names per sequence (None / "__base__" = base model only). When omitted, the names of the innermost
    ``using_adapters`` block (MultiAdapterModel opens one per call) are used; nothing is stored on the module.
    """

    def __init__(self, base_layer: nn.Module, bank: AdapterBank, *, dropout_p: float | Mapping[str, float] = 0.0,
                 regime: str = "auto", backend: str | None = None):
        super().__init__()
        w = getattr(base_layer, "weight", None)
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise TypeError(f"base_layer must be an nn.Linear or a transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        K, N = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        if not isinstance(bank, AdapterBank):
            raise TypeError(f"bank must be a fastlora AdapterBank, got {type(bank).__name__}")
        if (bank.in_features, bank.out_features) != (K, N):
            raise ValueError(f"bank must be for in_features={K}, out_features={N} (the base layer's), got "
                             f"{bank.in_features}, {bank.out_features}")
        per = dict(dropout_p) if isinstance(dropout_p, Mapping) else {}
        default = 0.0 if isinstance(dropout_p, Mapping) else dropout_p
        for what, q in [("dropout_p", default)] + [(f"dropout_p[{k!r}]", v) for k, v in per.items()]:
            if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0.0 <= q < 1.0):
                raise ValueError(f"{what} must be a float in [0, 1), got {q!r}")
        self.base_layer, self.bank = base_layer, bank
        self.dropout_p, self.regime, self.backend = float(default), regime, backend
        self.adapter_dropout: dict[str, float] = {k: float(v) for k, v in per.items()}   # name -> p (PEFT's)
        self.in_features, self.out_features = K, N

    def forward(self, x: Tensor, adapter_ids=None, *, plan: BatchPlan | None = None,
                seed: int | Tensor | None = None) -> Tensor:
        if adapter_ids is None and plan is None:
            call = current_adapter_call()
            if call is None:
                raise ValueError("MultiLoraLinear needs adapter_ids (a tensor of adapter indices, or a list of "
                                 "adapter names) or plan= (fastlora.plan_batch); none given and the call is not "
                                 "inside using_adapters(...) (MultiAdapterModel opens one per call)")
            plan = call.plan_for(self.bank, x, self.regime)
        elif adapter_ids is not None and not isinstance(adapter_ids, Tensor):
            adapter_ids = _names_list(adapter_ids, "adapter_ids")
        p = ([self.adapter_dropout.get(n, self.dropout_p) for n in self.bank.names]
             if self.adapter_dropout and self.training else self.dropout_p)     # (eval: no dropout at all)
        if _TRACING:
            _tracing.record(self)
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.bank, adapter_ids, p,
                                 self.training, self.fan_in_fan_out, plan=plan, seed=seed, regime=self.regime,
                                 backend=self.backend)


__all__ = ["MultiLoraLinear", "multi_lora_linear", "expand_ids", "plan_batch", "BatchPlan", "using_adapters",
           "AdapterCall", "current_adapter_call", "keep_adapters_for_recompute"]


def __getattr__(name):   # MultiAdapterModel lives in fastlora.multi_peft; the old import path keeps working
    if name == "MultiAdapterModel":
        from .multi_peft import MultiAdapterModel
        return MultiAdapterModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
