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
and reason, and a count in ``fastlora.trace()`` (fastlora/tracing.py), which also counts fused calls.
The report lists the patched layers that will hand some calls back and when. Inside ``torch.autocast``
the fused op runs on operands cast to the autocast dtype, as F.linear and PEFT's adapter matmuls would
be (fastlora/_amp.py), so AMP training is fused too. Layers it can never serve (PEFT variants other
than DoRA, several active adapters, lora_bias, embeddings, convolutions, MultiheadAttention, a base
layer that is itself a tuner layer, hooked base layers, anything it cannot inspect…) are left alone
and listed in the report with the reason; the rest of the model is patched. PEFT's bitsandbytes
layers (lora.bnb.Linear4bit / Linear8bitLt) run fastlora.qlora.qlora_linear; PEFT DoRA adapters
(use_dora) run fastlora.dora.dora_linear.
PEFT's LoRA on MoE experts (``target_parameters``: nested lora.ParamWrappers) runs fastlora.moe through the
outermost wrapper of each experts module (fastlora.moe_peft); the inner ones are served through it and are not
listed on their own.

Dropout: PEFT's per-adapter nn.Dropout(p) (or nn.Identity -> p = 0) and loralib's nn.Dropout
(or its identity lambda) map onto lora_linear's dropout_p, applied when that dropout module is
in training mode. The mask is fastlora's (fastlora.dropout): on the CPU torch path one torch.rand per
element from torch's generator, as nn.Dropout draws (a different draw than its bernoulli_, the same law);
in the kernels a counter-based mask keyed by a seed drawn from torch's generator.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _amp
from . import dora as _dora
from . import moe_peft
from . import tracing as _tracing
from .functional import _lora_linear, lora_linear
from .modules import block_lora_B
from .tracing import ACTIVE as _TRACING, DISABLED, MERGED, FallbackWarning

_ATTR = "_fastlora_patch"
ADAPTER_NAMES = "adapter_names= (PEFT's mixed batch)"
DROPOUT_1 = "lora_dropout p = 1 in training (the adapter's input is all dropped; fastlora's dropout takes p < 1)"


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


# ---------------------------------------------------------------------------- detection

def _peft_linear_cls():
    try:
        from peft.tuners.lora.layer import Linear
    except Exception:  # noqa: BLE001 - PEFT absent or broken: nothing of it to patch
        return None
    return Linear


def _peft_lora_layer_cls():
    try:
        from peft.tuners.lora.layer import LoraLayer
    except Exception:  # noqa: BLE001
        return None
    return LoraLayer


def _peft_tuner_layer_cls():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # noqa: BLE001
        return None
    return BaseTunerLayer


def tuner_base_reason(m):
    """Why a PEFT LoRA layer whose ``base_layer`` is itself a tuner layer (LoRA on LoHa / LoKr / another adapter,
    PEFT's mixed models) is not served: the fused op computes the base from a plain weight, which would drop the
    inner adapter's contribution. None for a plain base layer."""
    inner = m._modules.get("base_layer")
    tuner = _peft_tuner_layer_cls()
    if inner is not None and tuner is not None and isinstance(inner, tuner):
        return (f"base layer is a {type(inner).__module__}.{type(inner).__name__} (a tuner layer stacked under "
                f"LoRA): its own forward computes the base, which fastlora does not fuse")
    return None


def _loralib():
    try:
        import loralib
    except Exception:  # noqa: BLE001
        return None
    return loralib


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _dropout_p(d):
    """(p, reason): PEFT/loralib dropout -> lora_linear's dropout_p (p = 1 is served only outside training)."""
    if type(d) is nn.Dropout:
        return float(d.p), None
    if type(d) is nn.Identity or getattr(d, "__name__", "") == "<lambda>":   # loralib: lambda x: x
        return 0.0, None
    return None, f"lora_dropout is {type(d).__name__}, not nn.Dropout or nn.Identity"


def _peft_base(m):
    """PEFT ≥ 0.7 wraps the base layer (get_base_layer); older versions subclassed nn.Linear. The usual one-level
    wrap is read from the module dict (get_base_layer's hasattr probe costs a failed attribute lookup per call)."""
    b = m._modules.get("base_layer")
    if b is not None and "base_layer" not in b._modules and "base_layer" not in b.__dict__:
        return b
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _peft_active(m):
    """The active adapters that have weights in this layer (PEFT's forward skips the others)."""
    act = getattr(m, "active_adapters", None)
    if act is None:
        act = getattr(m, "active_adapter", [])
    return [a for a in ([act] if isinstance(act, str) else act) if a in m.lora_A]


def peft_adapter_reason(m, dora_ok: bool = False):
    """Why the active adapter of a PEFT LoRA layer cannot take a fused forward (None if it can): exactly one
    active adapter, plain LoRA (or DoRA, where ``dora_ok``), no lora_bias, a dropout fastlora draws itself."""
    active = _peft_active(m)
    if len(active) != 1:
        return f"{len(active)} active adapters {active} in this layer (fastlora serves exactly one)"
    a = active[0]
    dora = dora_ok and _dora.is_peft_dora(m, a)
    if getattr(m, "use_dora", {}).get(a, False) and not dora:
        return f"adapter {a!r} uses DoRA"
    if a in getattr(m, "lora_variant", {}) and not dora:
        return f"adapter {a!r} is a LoRA variant ({type(m.lora_variant[a]).__name__})"
    if getattr(m, "lora_bias", {}).get(a, False):
        return f"adapter {a!r} has lora_bias=True"
    return _dropout_p(m.lora_dropout[a])[1]


def _peft_reason(m):
    """Why this PEFT lora.Linear cannot take the fused forward (None if it can)."""
    base = _peft_base(m)
    if base is not m and not (type(base) is nn.Linear or _is_conv1d(base)):
        return f"base layer is {type(base).__name__} (only nn.Linear and transformers Conv1D)"
    if base is not m and (base._forward_hooks or base._forward_pre_hooks):
        return "base layer has forward hooks"
    why = peft_adapter_reason(m, dora_ok=True)
    if why:
        return why
    a = _peft_active(m)[0]
    w, A, B = base.weight, m.lora_A[a].weight, m.lora_B[a].weight
    k, n = A.shape[1], B.shape[0]
    want = (k, n) if m.fan_in_fan_out else (n, k)
    if tuple(w.shape) != want or B.shape[1] != A.shape[0]:
        return f"weight {tuple(w.shape)} does not match lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}"
    if A.dtype != B.dtype or A.dtype not in (w.dtype, torch.float32) or w.dtype not in \
            (torch.float32, torch.float16, torch.bfloat16):
        return f"dtypes weight {w.dtype}, lora_A {A.dtype}, lora_B {B.dtype} not supported"
    return None


def _loralib_reason(m, merged_linear: bool):
    if m.r <= 0:
        return "r == 0 (no adapter)"
    if merged_linear and not any(m.enable_lora):
        return "enable_lora enables no slice"
    _, why = _dropout_p(m.lora_dropout)
    return why


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
        from . import qlora                             # lazy: qlora imports this module
        kind = qlora.peft_kind(m)
        if kind is not None:                            # PEFT's bitsandbytes lora.Linear4bit / Linear8bitLt
            return kind, qlora.peft_reason(m)
        return f"peft.{type(m).__name__}", f"PEFT {type(m).__name__} layers are not served (only lora.Linear)"
    if ll is not None:
        if type(m) is ll.Linear:
            return "loralib.Linear", _loralib_reason(m, False)
        if type(m) is ll.MergedLinear:
            return "loralib.MergedLinear", _loralib_reason(m, True)
        if isinstance(m, ll.LoRALayer):
            return f"loralib.{type(m).__name__}", f"loralib {type(m).__name__} layers are not served"
    return None, None


# ---------------------------------------------------------------------------- fused forwards

def amp_reason(amp, *tensors) -> str:
    """Why a call inside torch.autocast(``amp``) cannot run fused with autocast's semantics."""
    if amp not in _amp._HALF:
        return f"inside torch.autocast with dtype {amp} (fastlora serves float16 / bfloat16 autocast)"
    bad = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype not in _amp._CASTABLE})
    return f"{', '.join(bad)} tensors inside torch.autocast (autocast leaves them uncast)"


def runtime_reason(x, w, lora_A, lora_B, dropout, amp=None):
    """Why this call cannot run the fused op as the library would compute it (None: it can), judged on what
    can change after patching. Under autocast (``amp``: its dtype) every operand is cast to ``amp`` first, as
    F.linear would."""
    if not isinstance(x, torch.Tensor):
        return f"x is a {type(x).__name__}, not a tensor"
    p, why = _dropout_p(dropout)
    if why is not None:
        return why
    if p >= 1.0 and getattr(dropout, "training", False):
        return DROPOUT_1
    if amp is not None:
        return None if _amp.servable(amp, x, w, lora_A, lora_B) else amp_reason(amp, x, w, lora_A, lora_B)
    if x.dtype != w.dtype:
        return f"x is {x.dtype}, the base weight {w.dtype} (cast x, or run inside torch.autocast)"
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (w.dtype, torch.float32):
        return f"adapter dtypes lora_A {lora_A.dtype}, lora_B {lora_B.dtype} on a {w.dtype} base"
    return None


def peft_call_reason(m, args, kwargs, dora_ok: bool = True):
    """(reason, adapter): why a call of a patched PEFT layer goes to PEFT's forward, judged from the call's extra
    arguments and the layer's state (reason None: ``adapter``, the one active adapter, may run fused)."""
    if getattr(m, "disable_adapters", False):
        return DISABLED, None
    if args or kwargs:
        if kwargs.get("adapter_names") is not None:
            return ADAPTER_NAMES, None
        extra = [k for k, v in kwargs.items() if v is not None]
        if args or extra:
            return f"extra forward arguments ({len(args)} positional, keywords {extra})", None
    if getattr(m, "merged", False):
        return MERGED, None
    a = _peft_single_active(m)
    if a is None:
        active = _peft_active(m)
        return f"{len(active)} active adapters {active} in this layer (fastlora serves exactly one)", None
    if a in getattr(m, "lora_variant", {}) and not (dora_ok and _dora.is_peft_dora(m, a)):
        return f"adapter {a!r} is a LoRA variant ({type(m.lora_variant[a]).__name__})", None
    return None, a


def hand_back(m, reason: str, x, args=(), kwargs=None, library: str = "PEFT"):
    """Run the layer's own forward for this call, saying so (a warning once per layer and reason; the trace)."""
    st = getattr(m, _ATTR)
    _tracing.fall_back(m, st.name, st.warned, reason, library)
    return type(m).forward(m, x, *args, **(kwargs or {}))


def _fused(x, w, lora_A):
    """The fused op for this call: without lora_linear's checks (the layer's tensors were checked at patch time,
    their dtypes by runtime_reason) when x fits the layer, else lora_linear itself, whose error names what is wrong."""
    if x.ndim and x.shape[-1] == lora_A.shape[1] and x.device == w.device:
        return _lora_linear
    return lora_linear


def _peft_single_active(m):
    """The one active adapter with weights in this PEFT layer (PEFT's forward skips the others), else None."""
    act, here = m.active_adapter, m._modules["lora_A"]._modules
    if type(act) is str:
        return act if act in here else None
    act = [a for a in act if a in here]
    return act[0] if len(act) == 1 else None


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
    if _dora.is_peft_dora(self, a):
        y = _dora.peft_dora_forward(self, x, a, st.scale(self.scaling[a], x.device), p, amp)
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
        from . import qlora                             # lazy: qlora imports this module
        whens += qlora.predicted_fallbacks(m)
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
    ParamWrapper of each experts module, fastlora.moe_peft) and loralib Linear / MergedLinear in ``model`` the
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
                from .qlora import peft_forward as fn
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
