"""fastlora.patch / fastlora.unpatch: give PEFT and loralib LoRA layers the fused forward, in place.

    report = fastlora.patch(model)      # every PEFT lora.Linear, loralib Linear / MergedLinear
    print(report)                       # what was patched, what was not and why
    fastlora.unpatch(model)             # the original forwards back

How: the layer object stays the same object, of the same class, with the same parameters,
buffers and state-dict keys (patch checks this and undoes itself if it were not so); only its
``forward`` is shadowed by an instance attribute that calls ``fastlora.lora_linear`` on the
layer's own tensors. So PEFT's save_pretrained / merge_and_unload / set_adapter and loralib's
mark_only_lora_as_trainable / lora_state_dict keep working unchanged.

At every call the patched forward re-checks what can change after patching (merged, adapters
disabled, the active adapter, PEFT's mixed-batch ``adapter_names``, a dtype mismatch) and hands
anything it cannot serve to the layer's original forward, saying so: a FallbackWarning once per layer
and reason, and a count in ``fastlora.trace()`` (fastlora/core/tracing.py), which also counts fused calls.
The report lists the patched layers that will hand some calls back and when. Inside ``torch.autocast``
the fused op runs on operands cast to the autocast dtype, as F.linear and PEFT's adapter matmuls would
be (fastlora/core/amp.py), so AMP training is fused too. Layers it can never serve (PEFT variants other
than DoRA, several active adapters, lora_bias, embeddings, convolutions, MultiheadAttention, a base
layer that is itself a tuner layer, hooked base layers, anything it cannot inspect…) are left alone
and listed in the report with the reason; the rest of the model is patched. PEFT's bitsandbytes
layers (lora.bnb.Linear4bit / Linear8bitLt) run fastlora.ops.qlora.qlora_linear; PEFT DoRA adapters
(use_dora) run fastlora.ops.dora.dora_linear.
PEFT's LoRA on MoE experts (``target_parameters``: nested lora.ParamWrappers) runs fastlora.ops.moe through the
outermost wrapper of each experts module (fastlora.integrations.moe_peft); the inner ones are served through it and are not
listed on their own.

Dropout: PEFT's per-adapter nn.Dropout(p) (or nn.Identity -> p = 0) and loralib's nn.Dropout
(or its identity lambda) map onto lora_linear's dropout_p, applied when that dropout module is
in training mode. The mask is fastlora's (fastlora.core.dropout): on the CPU torch path one torch.rand per
element from torch's generator, as nn.Dropout draws (a different draw than its bernoulli_, the same law);
in the kernels a counter-based mask keyed by a seed drawn from torch's generator.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import amp as _amp
from ..core import tracing as _tracing
from ..core.tracing import ACTIVE as _TRACING, MERGED, FallbackWarning
from ..nn.lora import block_lora_B
from . import moe_peft, peft_dora, peft_qlora
from .peft_layers import (_ATTR, DROPOUT_1, _dropout_p, _fused, _loralib, _loralib_reason, _peft_active, _peft_base,
                          _peft_linear_cls, _peft_lora_layer_cls, _peft_reason, hand_back, peft_call_reason,
                          runtime_reason, tuner_base_reason)



@dataclass
class PatchReport:
    """patched: module path -> kind; skipped: module path -> why it keeps its own forward; fallbacks: patched
    module path -> when it will hand calls back to its own forward at run time (beyond the calls every patched
    layer hands back: PEFT's mixed-batch ``adapter_names=``, merged weights, adapters disabled)."""
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastlora.patch: {len(self.patched)} layer(s) patched, {len(self.skipped)} not patched"]
        lines += [f"  patched  {p or '<root>'}  ({k})" for p, k in self.patched.items()]
        lines += [f"  skipped  {p or '<root>'}: {why}" for p, why in self.skipped.items()]
        lines += [f"  falls back at run time  {p or '<root>'}: {when}" for p, when in self.fallbacks.items()]
        if self.patched:
            lines.append("  (every patched layer runs its own forward for adapter_names= calls, merged weights and "
                         "disabled adapters; a fall-back warns once per layer and reason, fastlora.trace() counts "
                         "every call)")
        return "\n".join(lines)


class _State:
    """What a patched layer keeps on the side (a plain attribute: not in the state dict): its kind, its module
    path at patch time (the name fastlora.trace and the fall-back warnings use), the fall-back reasons already
    warned about, and the MergedLinear row indices."""

    def __init__(self, kind):
        self.kind, self.rows, self.name, self.warned = kind, None, "", set()

    @staticmethod
    def scale(value, device):
        """The layer's scaling as lora_linear takes it: a tensor as it is, a number as a float (the op keeps
        one cached 0-d tensor per value: no allocation, and no tensor read to validate it, per call)."""
        return value if isinstance(value, torch.Tensor) else float(value)


def _classify(m):
    """(kind, reason) for a module fastlora knows about; (None, None) for one it ignores. A LoRA layer that
    cannot be inspected (a kind newer than this code) is reported as not served, never an error."""
    try:
        return _classify_known(m)
    except Exception as e:  # noqa: BLE001 - whatever a layer kind does, patch serves the rest of the model
        return type(m).__name__, f"could not be inspected ({type(e).__name__}: {e})"


def _classify_known(m):
    peft_lin, peft_layer, ll = _peft_linear_cls(), _peft_lora_layer_cls(), _loralib()
    pw = moe_peft.param_wrapper_cls()
    if pw is not None and type(m) is pw:      # the outermost of a chain (patch skips the inner ones); its base
        return moe_peft.describe(m), moe_peft.chain_reason(m)    # being another ParamWrapper is the chain itself
    if peft_layer is not None and isinstance(m, peft_layer):
        why = tuner_base_reason(m)
        if why is not None:
            return f"peft.{type(m).__name__}", why
    if peft_lin is not None and isinstance(m, peft_lin) and type(m) is peft_lin:
        return "peft.Linear", _peft_reason(m)
    if peft_layer is not None and isinstance(m, peft_layer):
        kind = peft_qlora.peft_kind(m)
        if kind is not None:                            # PEFT's bitsandbytes lora.Linear4bit / Linear8bitLt
            return kind, peft_qlora.peft_reason(m)
        return f"peft.{type(m).__name__}", f"PEFT {type(m).__name__} layers are not served (only lora.Linear)"
    if ll is not None:
        if type(m) is ll.Linear:
            return "loralib.Linear", _loralib_reason(m, False)
        if type(m) is ll.MergedLinear:
            return "loralib.MergedLinear", _loralib_reason(m, True)
        if isinstance(m, ll.LoRALayer):
            return f"loralib.{type(m).__name__}", f"loralib {type(m).__name__} layers are not served"
    return None, None



# ---------------------------------------------------------------------------- patched forwards

def _peft_forward(self, x, *args, **kwargs):
    st = getattr(self, _ATTR)
    amp = _amp.autocast_dtype(x)
    why, a = peft_call_reason(self, args, kwargs)
    if why is None:
        base, mods = _peft_base(self), self._modules        # ModuleDicts read directly: host time per call
        drop = mods["lora_dropout"]._modules[a]
        lora_A, lora_B = mods["lora_A"]._modules[a].weight, mods["lora_B"]._modules[a].weight
        why = runtime_reason(x, base.weight, lora_A, lora_B, drop, amp)
    if why is not None:
        return hand_back(self, why, x, args, kwargs)
    p = _dropout_p(drop)[0] if drop.training else 0.0
    if peft_dora.is_peft_dora(self, a):
        y = peft_dora.peft_dora_forward(self, x, a, st.scale(self.scaling[a], x.device), p, amp)
        if y is None:
            return hand_back(self, "DoRA tensors' dtypes (weight, lora_A, lora_B, magnitude) not served", x, args,
                             kwargs)
    else:
        y = _amp.call(_fused(x, base.weight, lora_A), amp, x, base.weight, base.bias, lora_A, lora_B,
                      st.scale(self.scaling[a], x.device), p, drop.training, self.fan_in_fan_out)
    if _TRACING:
        _tracing.record(self, None, st.name)
    return y


def _loralib_forward(self, x):
    st = getattr(self, _ATTR)
    amp = _amp.autocast_dtype(x)
    why = MERGED if self.merged else "r <= 0 (no adapter)" if self.r <= 0 else \
        runtime_reason(x, self.weight, self.lora_A, self.lora_B, self.lora_dropout, amp)
    if why is not None:
        return hand_back(self, why, x, library="loralib")
    p, _ = _dropout_p(self.lora_dropout)
    training = self.lora_dropout.training if isinstance(self.lora_dropout, nn.Module) else self.training
    lora_B = self.lora_B
    if st.kind == "loralib.MergedLinear":
        if st.rows is None or st.rows.device != lora_B.device:
            st.rows = self.lora_ind.to(lora_B.device).nonzero().squeeze(1)
        lora_B = block_lora_B(lora_B, sum(self.enable_lora), st.rows, self.out_features)
    y = _amp.call(_fused(x, self.weight, self.lora_A), amp, x, self.weight, self.bias, self.lora_A, lora_B,
                  st.scale(self.scaling, x.device), p if training else 0.0, training, self.fan_in_fan_out)
    if _TRACING:
        _tracing.record(self, None, st.name)
    return y


def _predicted_fallbacks(m, kind) -> str | None:
    """When a layer about to be patched will hand calls back at run time, as far as its configuration says."""
    whens = []
    drop = m.lora_dropout if kind.startswith("loralib") else m.lora_dropout[_peft_active(m)[0]]
    if _dropout_p(drop)[0] >= 1.0:
        whens.append("training calls: " + DROPOUT_1)
    if kind.startswith("peft.bnb."):
        whens += peft_qlora.predicted_fallbacks(m)
    return "; ".join(whens) or None


# ---------------------------------------------------------------------------- public API

def _fingerprint(model: nn.Module):
    """What every parameter / buffer of ``model`` is — storage, shape, strides, dtype, device, bitsandbytes
    quant state — read without side effects. Storage rather than Python object: PEFT's lora.MultiheadAttention
    registers new Parameter objects over the same storage on every named_modules() call.

    Not model.state_dict(): its hooks may change the model (bitsandbytes' Linear4bit un-packs a
    CPU-repacked weight there, re-quantizing its absmax) and build fresh tensors on every call."""
    ts = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {k: (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype, v.device, id(getattr(v, "quant_state", None)))
            for k, v in ts}


def patch(model: nn.Module, *, strict: bool = False, warn: bool = True) -> PatchReport:
    """Give every PEFT lora.Linear (and DoRA, QLoRA layers, and LoRA on MoE experts: the outermost
    ParamWrapper of each experts module, fastlora.integrations.moe_peft) and loralib Linear / MergedLinear in ``model`` the
    fused forward.

    Returns a PatchReport; warns once (FallbackWarning) if some LoRA layers could not be patched. A layer kind
    it does not serve (embeddings, convolutions, MultiheadAttention, anything new) is skipped and reported, and
    the rest is patched. With ``strict``, an unpatchable LoRA layer raises ValueError naming its module path and
    nothing is patched. Patching twice is harmless (already patched layers are listed as patched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report, todo = PatchReport(), []
    inner = moe_peft.inner_wrappers(model)              # served (or not) through their outermost ParamWrapper
    for path, m in model.named_modules():
        kind, why = _classify(m) if id(m) not in inner else (None, None)
        if kind is None:
            continue
        if hasattr(m, _ATTR):
            report.patched[path] = kind
        elif why is None and "forward" in m.__dict__:
            report.skipped[path] = "forward is already replaced on this instance (e.g. by accelerate hooks)"
        elif why is not None:
            report.skipped[path] = why
        else:
            todo.append((path, m, kind))
    if strict and report.skipped:
        path, why = next(iter(report.skipped.items()))
        raise ValueError(f"fastlora.patch(strict=True): cannot patch {path or '<root>'}: {why}")
    # the integrity check covers what patch changes: the layers it patches (their parameters, buffers, quant state)
    before = [_fingerprint(m) for _, m, _ in todo]
    try:
        for path, m, kind in todo:
            state = _State(kind)
            if kind.startswith("peft.bnb."):
                fn = peft_qlora.peft_forward
            elif kind.startswith(moe_peft.KIND):
                fn, state = moe_peft.peft_experts_forward, moe_peft.ChainState(m)
            else:
                fn = _peft_forward if kind == "peft.Linear" else _loralib_forward
            try:
                when = _predicted_fallbacks(m, kind)
            except Exception:  # noqa: BLE001 - a prediction only: the run-time checks still hold
                when = None
            state.name = path
            object.__setattr__(m, _ATTR, state)
            object.__setattr__(m, "forward", functools.partial(fn, m))   # picklable: fn is module-level
            report.patched[path] = kind
            if when:
                report.fallbacks[path] = when
        if [_fingerprint(m) for _, m, _ in todo] != before:   # cannot happen by construction: never leave a
            raise RuntimeError("fastlora.patch changed the model's parameters/buffers; patch undone")  # half-done model
    except BaseException:
        for _, m, _ in todo:
            _remove(m)
        raise
    if warn and report.skipped:
        warnings.warn(f"fastlora.patch: {len(report.skipped)} LoRA layer(s) keep their original forward: "
                      + "; ".join(f"{p or '<root>'}: {w}" for p, w in report.skipped.items()), FallbackWarning,
                      stacklevel=2)
    return report


def _remove(m: nn.Module) -> None:
    m.__dict__.pop("forward", None)
    m.__dict__.pop(_ATTR, None)


def unpatch(model: nn.Module) -> list[str]:
    """Restore the original forward of every layer ``patch`` changed; returns their module paths."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for path, m in model.named_modules():
        if _ATTR in m.__dict__:
            _remove(m)
            done.append(path)
    return done


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` currently runs fastlora's fused forward via ``patch``."""
    return _ATTR in module.__dict__


__all__ = ["PatchReport", "patch", "unpatch", "is_patched"]
