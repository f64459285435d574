"""MultiLoraLinear: a frozen base layer plus an AdapterBank, adapters chosen per token (``fastlora.ops.multi``).

The adapters of one model call (MultiAdapterModel, ``using_adapters``) live in a ContextVar, not on the layers:
``AdapterCall`` holds them and builds one batch plan per bank layout, shared by every layer of the call.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core import tracing as _tracing
from ..core.checks import cached_tensor, is_conv1d
from ..core.tracing import ACTIVE as _TRACING
from ..ops.bank import AdapterBank
from ..ops.multi import multi_lora_linear
from ..ops.multi_plan import BatchPlan, names_list, plan_batch


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
        self.names = names_list(names, "adapter_names") if names is not None else None
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
        self.fan_in_fan_out = is_conv1d(base_layer)
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
            adapter_ids = names_list(adapter_ids, "adapter_ids")
        p = ([self.adapter_dropout.get(n, self.dropout_p) for n in self.bank.names]
             if self.adapter_dropout and self.training else self.dropout_p)     # (eval: no dropout at all)
        if _TRACING:
            _tracing.record(self)
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.bank, adapter_ids, p,
                                 self.training, self.fan_in_fan_out, plan=plan, seed=seed, regime=self.regime,
                                 backend=self.backend)


__all__ = ["MultiLoraLinear", "using_adapters", "AdapterCall", "current_adapter_call", "keep_adapters_for_recompute"]
