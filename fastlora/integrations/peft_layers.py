"""What fastlora.patch reads of a PEFT / loralib LoRA layer, and what its patched forwards share.

Detection (the library classes, imported only if the library is), the reasons a layer or a call cannot take the
fused forward (each a sentence: the report and the fall-back warnings print it), and ``hand_back``: a call the
fused op cannot serve runs the layer's own forward, saying so.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..core import amp as _amp
from ..core import tracing as _tracing
from ..core.checks import is_conv1d
from ..core.tracing import DISABLED, MERGED
from ..ops.lora import _lora_linear, lora_linear
from . import peft_dora

_ATTR = "_fastlora_patch"
ADAPTER_NAMES = "adapter_names= (PEFT's mixed batch)"
DROPOUT_1 = "lora_dropout p = 1 in training (the adapter's input is all dropped; fastlora's dropout takes p < 1)"


# ---------------------------------------------------------------------------- detection

def _optional(module: str, name: str | None = None):
    """``module`` (or its attribute ``name``), or None when the library is absent or broken: nothing of it to patch."""
    try:
        m = importlib.import_module(module)
        return m if name is None else getattr(m, name)
    except Exception:  # noqa: BLE001
        return None


def _peft_linear_cls():
    return _optional("peft.tuners.lora.layer", "Linear")


def _peft_lora_layer_cls():
    return _optional("peft.tuners.lora.layer", "LoraLayer")


def _peft_tuner_layer_cls():
    return _optional("peft.tuners.tuners_utils", "BaseTunerLayer")


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
    return _optional("loralib")


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
    dora = dora_ok and peft_dora.is_peft_dora(m, a)
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
    if base is not m and not (type(base) is nn.Linear or is_conv1d(base)):
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
    if a in getattr(m, "lora_variant", {}) and not (dora_ok and peft_dora.is_peft_dora(m, a)):
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
