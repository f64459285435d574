"""MultiAdapterModel: a PEFT model with several LoRA adapters, run in mixed batches through MultiLoraLinear.

    mm = MultiAdapterModel(peft_model)
    mm(input_ids, adapter_names=["math", "__base__", "code"])          one adapter per sequence
    mm(input_ids, adapter_ids=ids)                                     the same as an int tensor (CUDA graphs)
    mm.generate(input_ids, adapter_names=[...], max_new_tokens=8)       the same for generation
    peft_model(input_ids, adapter_names=[...])                          PEFT's own mixed batch: routed here too
    optimizer = torch.optim.AdamW(mm.parameters()); ...                trains the adapters PEFT trains (not the
                                                                       frozen ones), every one of a mixed batch
    mm.save_pretrained(path) / mm.sync_to_peft() / mm.restore()        the trained values back in PEFT's Parameters

The adapter names travel with the call (fastlora.nn.multi.using_adapters, a ContextVar), never as state on
the layers; each call builds the batch plan once per bank layout (fastlora.ops.multi_plan), shared by every layer. Attributes the wrapper lacks come from the wrapped model (``mm.config``, ``mm.device`` …).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from torch import nn

from ..nn.multi import _TRACED, AdapterCall, MultiLoraLinear, keep_adapters_for_recompute, using_adapters
from ..ops.bank import BASE, AdapterBank
from ..ops.multi_plan import names_list
from .moe_peft import param_wrapper_cls

# PEFT methods that read or change the LoRA layers, which are swapped out while wrapped
_NEEDS_PEFT_LAYERS = ("merge_and_unload", "merge_adapter", "unmerge_adapter", "unload", "set_adapter",
                      "add_adapter", "delete_adapter", "add_weighted_adapter", "disable_adapter", "load_adapter",
                      "get_peft_model_state_dict", "get_nb_trainable_parameters", "print_trainable_parameters")


def _lora_dropout_p(module, name: str) -> float:
    """PEFT's dropout probability of adapter ``name`` on a lora.Linear (nn.Identity: 0)."""
    return float(getattr(module.lora_dropout[name], "p", 0.0))


class MultiAdapterModel(nn.Module):
    """Runs a PEFT model holding several LoRA adapters with a different adapter per sequence.

    Every PEFT ``lora.Linear`` with adapters is replaced (in place) by a MultiLoraLinear whose bank holds
    a copy of that layer's adapters, scalings and per-adapter dropout p; ``forward(*args,
    adapter_names=[...], **kwargs)`` and ``generate(...)`` take one name per sequence ("__base__" = no
    adapter), as PEFT's own mixed-batch ``adapter_names=``; names a layer lacks mean "base" there, as in
    PEFT. While wrapped, PEFT's ``peft_model(..., adapter_names=...)`` / ``peft_model.generate(...)`` run
    through the banks too. ``restore()`` puts the PEFT layers back.

    Training: each adapter's ``lora_A`` / ``lora_B`` in a bank is its own Parameter (a view of the bank's
    packed storage, what the kernels read) with PEFT's ``requires_grad``: an optimizer over this model's
    ``parameters()`` trains the adapters PEFT trains and leaves the ones PEFT froze bitwise unchanged (they get
    no gradient; AdamW's weight decay skips them too). The banks hold copies, so the trained values reach
    PEFT's own Parameters through ``sync_to_peft()`` (which ``restore()`` and ``save_pretrained()`` call); a
    frozen adapter is never written back. ``bank.requires_grad_(flag, adapter=name)`` changes what trains.
    """

    def __init__(self, peft_model: nn.Module, *, dtype: torch.dtype | None = None, regime: str = "auto",
                 backend: str | None = None):
        super().__init__()
        from peft.tuners.lora import Linear as PeftLoraLinear

        pw = param_wrapper_cls()
        experts = [n for n, m in peft_model.named_modules() if pw is not None and isinstance(m, pw)]
        if experts:   # they would run PEFT's active adapter for every sequence: refuse rather than mislead
            raise ValueError(f"MultiAdapterModel does not serve LoRA on MoE experts (PEFT target_parameters, e.g. "
                             f"{experts[0]}): per-sequence adapters would not reach the experts")
        self.model = peft_model
        self._swapped: list[tuple[nn.Module, str, nn.Module, MultiLoraLinear]] = []
        for name, module in list(peft_model.named_modules()):
            if not isinstance(module, PeftLoraLinear) or not module.lora_A:
                continue
            parent = peft_model.get_submodule(name.rpartition(".")[0]) if "." in name else peft_model
            bank = AdapterBank.from_peft_layer(module, dtype=dtype)       # PEFT's requires_grad, per adapter
            layer = MultiLoraLinear(module.get_base_layer(), bank, regime=regime, backend=backend,
                                    dropout_p={n: _lora_dropout_p(module, n) for n in bank.names})
            layer.train(module.training)
            self._swapped.append((parent, name.rpartition(".")[2], module, layer))
        if not self._swapped:
            raise ValueError("the model has no PEFT lora.Linear layer with adapters")
        for parent, attr, _, layer in self._swapped:
            setattr(parent, attr, layer)
        self.__dict__["_hooked"] = self._route_peft_mixed_batches()   # not a submodule: no second state_dict entry

    # ------------------------------------------------------------------ calls
    def _check_names(self, adapter_names) -> list:
        names = names_list(adapter_names, "adapter_names")
        known = set().union(*(layer.bank.names for _, _, _, layer in self._swapped))
        unknown = sorted({n for n in names if n is not None and n != BASE and n not in known})
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}; the model holds {sorted(known)} (and {BASE!r})")
        return names

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of the wrapped model, in a fixed order: what ``adapter_ids`` index."""
        seen: dict = {}
        for _, _, _, layer in self._swapped:
            seen.update(dict.fromkeys(layer.bank.names))
        return list(seen)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, adapter_ids: torch.Tensor | None = None,
                **kwargs):
        """The wrapped model's forward with one adapter per sequence: ``adapter_names`` (a list, "__base__" = no
        adapter), or ``adapter_ids``, an int tensor on the model's device of shape (batch,) (or one per token)
        indexing ``self.adapter_names`` (−1 = no adapter). With ids no host copy is made once a first call has
        run, so a forward can be captured in a CUDA graph and replayed after ``adapter_ids.copy_(new_ids)``.
        Each call builds one batch plan per bank layout, shared by every layer."""
        if (adapter_names is None) == (adapter_ids is None):
            raise ValueError("give exactly one of adapter_names= (a list, one name per sequence) and adapter_ids= "
                             "(an int tensor indexing .adapter_names)")
        if adapter_ids is not None:
            call = AdapterCall(ids=adapter_ids, index=self.adapter_names)
        else:
            call = self._check_names(adapter_names)
        if torch.compiler.is_compiling():       # traced whole (fullgraph): the call on a stack, not a ContextVar
            call = call if isinstance(call, AdapterCall) else AdapterCall(call)
            _TRACED.append(call)
            try:
                return self.model(*args, **kwargs)
            finally:
                _TRACED.pop()
        if self.model.training:
            self._keep_adapters_for_recompute()
        with using_adapters(call):
            return self.model(*args, **kwargs)

    def _keep_adapters_for_recompute(self):
        """Activation checkpointing (transformers' ``_gradient_checkpointing_func`` on its layers) recomputes
        layers during backward, outside this call's using_adapters block: wrap each such function so the
        recompute sees the names of the call that ran it first (fastlora.nn.multi.keep_adapters_for_recompute)."""
        for m in self.model.modules():
            f = m.__dict__.get("_gradient_checkpointing_func")
            if f is not None and not getattr(f, "_fastlora_keeps_adapters", False):
                m._gradient_checkpointing_func = keep_adapters_for_recompute(f)

    def generate(self, *args, adapter_names: Sequence[str], **kwargs):
        """The wrapped model's ``generate`` with one adapter per sequence (beam search: each name repeated
        num_beams times, as PEFT does). Decoder-only models; for encoder-decoder models the encoder would
        see the repeated names too."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"the wrapped {type(self.model).__name__} has no generate()")
        with using_adapters(_expand_beams(self._check_names(adapter_names), kwargs)):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ PEFT interplay
    def _route_peft_mixed_batches(self):
        """Make PEFT's own ``adapter_names=`` path (PeftModel.forward / generate → LoraModel's
        ``_enable_peft_forward_hooks``) open a using_adapters block instead of hooking its (swapped-out) layers:
        an instance attribute shadowing the method, removed by restore()."""
        lora_model = getattr(self.model, "base_model", self.model)
        if not hasattr(lora_model, "_enable_peft_forward_hooks"):
            return None

        @contextlib.contextmanager
        def hooks(*args, **kwargs):
            names = kwargs.pop("adapter_names", None)
            if names is None:
                yield
                return
            names = _expand_beams(self._check_names(names), kwargs)
            if self.model.training:
                self._keep_adapters_for_recompute()
            with using_adapters(names):
                yield

        lora_model.__dict__["_enable_peft_forward_hooks"] = hooks
        return lora_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_swapped", "_hooked"):
                raise
        if name in _NEEDS_PEFT_LAYERS:
            raise AttributeError(f"{name}() needs PEFT's LoRA layers, which MultiAdapterModel has swapped out; call "
                                 f"restore() first (it returns the PEFT model with the trained weights)")
        return getattr(self.model, name)

    # ------------------------------------------------------------------ training: back to PEFT
    @torch.no_grad()
    def sync_to_peft(self) -> int:
        """Copy the banks' trained adapter weights and scalings into the PEFT model's own Parameters.

        Each bank holds copies of its layer's adapters (Parameters viewing one packed buffer) that an optimizer
        over this model's parameters trains; PEFT's per-adapter Parameters are separate tensors. Call this
        before using the PEFT model (``restore()`` and ``save_pretrained()`` call it). Only trainable tensors
        (``requires_grad`` in the bank) are written, and only where their bank values differ from PEFT's (seen
        in the bank's dtype), so untrained adapters keep PEFT's exact values even when the bank is in a narrower
        dtype; a scaling is written where it differs from PEFT's in float32. A frozen adapter is never written:
        if its bank values or scaling differ from PEFT's (changed by hand in the bank), a UserWarning names it.
        Everything is checked before anything is copied. Returns the number of adapter layers copied.
        """
        plan = []
        for _, attr, peft_layer, layer in self._swapped:
            for name in layer.bank.names:
                A, B, s = layer.bank.adapter(name)
                if name not in peft_layer.lora_A:
                    raise ValueError(f"adapter {name!r} of the bank at {attr!r} is not in the PEFT layer (added to "
                                     f"the bank after wrapping); it cannot be synced back")
                pa, pb = peft_layer.lora_A[name].weight, peft_layer.lora_B[name].weight
                if pa.shape != A.shape or pb.shape != B.shape:
                    raise ValueError(f"adapter {name!r} at {attr!r}: the bank holds rank {A.shape[0]}, PEFT rank "
                                     f"{pa.shape[0]} (replaced in the bank after wrapping); it cannot be synced back")
                plan.append((attr, peft_layer, name, A, B, s, pa, pb))
        copied, kept = 0, []
        for attr, peft_layer, name, A, B, s, pa, pb in plan:
            changed = [(mine, peft) for mine, peft in ((A, pa), (B, pb)) if not torch.equal(peft.to(mine.dtype), mine)]
            s_changed = _f32(float(peft_layer.scaling[name])) != _f32(s)
            if not (A.requires_grad or B.requires_grad):
                if changed or s_changed:
                    kept.append(f"{name!r} at {attr!r}")
                continue
            for mine, peft in changed:
                if mine.requires_grad:
                    peft.copy_(mine)
                else:
                    kept.append(f"{name!r} at {attr!r} ({'lora_A' if mine is A else 'lora_B'})")
            copied += any(mine.requires_grad for mine, _ in changed)
            if s_changed:
                peft_layer.scaling[name] = s
        if kept:
            warnings.warn(f"sync_to_peft: frozen adapter weights differ from PEFT's and were not written back (a "
                          f"frozen adapter is never written; unfreeze it in its bank, bank.requires_grad_(True, "
                          f"adapter=name), to write it): {', '.join(kept)}", UserWarning, stacklevel=3)
        return copied

    @contextlib.contextmanager
    def peft_layers(self):
        """Inside the block the PEFT model has its own LoRA layers back (synced first); on exit they are
        swapped out again. For PEFT methods that read the layers."""
        self.sync_to_peft()
        for parent, attr, peft_layer, layer in self._swapped:
            setattr(parent, attr, peft_layer.train(layer.training))
        try:
            yield self.model
        finally:
            for parent, attr, _, layer in self._swapped:
                setattr(parent, attr, layer)

    def save_pretrained(self, *args, **kwargs):
        """PEFT's ``save_pretrained`` with the banks' trained values (synced first)."""
        with self.peft_layers() as model:
            return model.save_pretrained(*args, **kwargs)

    def restore(self) -> nn.Module:
        """Copy the trained values back (``sync_to_peft``), put the original PEFT layers back; returns the
        PEFT model."""
        self.sync_to_peft()
        for parent, attr, peft_layer, layer in self._swapped:
            setattr(parent, attr, peft_layer.train(layer.training))   # train()/eval() while wrapped reached only ours
        self._swapped = []
        for m in self.model.modules():
            f = m.__dict__.get("_gradient_checkpointing_func")
            if getattr(f, "_fastlora_keeps_adapters", False):
                m._gradient_checkpointing_func = f.__wrapped__
        if self._hooked is not None:
            self._hooked.__dict__.pop("_enable_peft_forward_hooks", None)
            self.__dict__["_hooked"] = None
        return self.model


def _f32(v: float) -> float:
    """v rounded to float32 (the bank's scalings are float32)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _expand_beams(names: list, kwargs: dict) -> list:
    beams = kwargs.get("num_beams")
    return [n for n in names for _ in range(beams)] if isinstance(beams, int) and beams > 1 else names


__all__ = ["MultiAdapterModel"]
