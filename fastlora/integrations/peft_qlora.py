"""PEFT's bitsandbytes LoRA layers (lora.bnb.Linear4bit / Linear8bitLt) through ``fastlora.ops.qlora``:
what fastlora.patch asks of them (kind, reasons, predicted fall-backs) and their patched forward."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core import amp as _amp
from ..core import tracing as _tracing
from ..core.tracing import ACTIVE as _TRACING
from ..ops.qlora import _COMPUTE, _bnb, base_reason, compute_dtype, packed_for_cpu, qlora_linear, quant_kind, recipe
from .peft_layers import (_ATTR, DROPOUT_1, _dropout_p, _peft_active, amp_reason, hand_back, peft_adapter_reason,
                          peft_call_reason)


def peft_kind(m) -> str | None:
    """"peft.bnb.Linear4bit" / "peft.bnb.Linear8bitLt" for PEFT's bnb LoRA layers, else None."""
    if _bnb() is None:
        return None
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except Exception:  # noqa: BLE001 - PEFT absent or broken
        return None
    for name in ("Linear4bit", "Linear8bitLt"):
        cls = getattr(peft_bnb, name, None)
        if cls is not None and type(m) is cls:
            return f"peft.bnb.{name}"
    return None


def peft_reason(m) -> str | None:
    """Why this PEFT bnb LoRA layer cannot take the fused forward (None if it can)."""
    base = m.get_base_layer()
    why = base_reason(base)
    if why is not None:
        return why
    if base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks"
    why = peft_adapter_reason(m)
    if why:
        return why
    a = _peft_active(m)[0]
    A, B = m.lora_A[a].weight, m.lora_B[a].weight
    if tuple(A.shape) != (A.shape[0], base.in_features) or tuple(B.shape) != (base.out_features, A.shape[0]):
        return f"lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match the base layer " \
               f"({base.out_features}, {base.in_features})"
    if A.dtype != B.dtype or A.dtype not in _COMPUTE:
        return f"adapter dtypes lora_A {A.dtype}, lora_B {B.dtype} not supported"
    return None


REPACKED = "bitsandbytes repacked the 4-bit weight for its AVX512-BF16 CPU kernel, a layout fastlora does not read"


def runtime_reason(x, base, A, B, dropout, amp) -> str | None:
    """What can change after patching: why this call would not match PEFT fused (None: it runs fused)."""
    if not isinstance(x, Tensor):
        return f"x is a {type(x).__name__}, not a tensor"
    p, why = _dropout_p(dropout)
    if why is not None:
        return why
    if p >= 1.0 and dropout.training:
        return DROPOUT_1
    if packed_for_cpu(base):
        return REPACKED
    if not (x.device == A.device == base.weight.device):
        return f"x on {x.device}, the layer on {base.weight.device}"
    if A.dtype != B.dtype:
        return f"adapter dtypes lora_A {A.dtype}, lora_B {B.dtype}"
    cd = compute_dtype(base, x)
    if amp is not None:
        if not _amp.servable(amp, x, A, B, base.bias):
            return amp_reason(amp, x, A, B, base.bias)
        if quant_kind(base) == "4bit" and cd not in (torch.float32, amp):
            return f"a {cd}-compute 4-bit layer inside torch.autocast({amp}) (x rounded to both dtypes)"
        return None
    if x.dtype not in _COMPUTE or cd not in _COMPUTE:
        return f"x is {x.dtype}; the layer computes in {cd}"
    if x.dtype == cd or cd == torch.float32:        # x cast to cd exactly: the op runs in cd
        return None if A.dtype in (cd, torch.float32) else f"{A.dtype} adapters on a {cd}-compute layer"
    if recipe(x, cd, A):
        return None
    return (f"{x.dtype} x into a {cd}-compute layer with {A.dtype} adapters (PEFT's adapter branch reads x in "
            f"{A.dtype}, its base in {cd})")


def predicted_fallbacks(m) -> list[str]:
    """The run-time fall-backs a PEFT bnb layer's configuration predicts (for patch's report)."""
    base, whens = m.get_base_layer(), []
    A = m.lora_A[_peft_active(m)[0]].weight
    if quant_kind(base) == "4bit" and base.weight.device.type == "cpu" \
            and getattr(base, "support_avx512bf16_for_cpu", False):
        whens.append("every call after an eval forward without grad (then " + REPACKED + ")")
    if A.dtype != torch.float32:
        whens.append(f"float32 x outside torch.autocast ({A.dtype} adapters: PEFT's adapter branch reads x in "
                     f"{A.dtype})")
    return whens


def peft_forward(self, x, *args, **kwargs):
    """The patched forward of PEFT's lora.bnb.Linear4bit / Linear8bitLt."""
    st = getattr(self, _ATTR)
    base = self.get_base_layer()
    amp = _amp.autocast_dtype(x)
    why, a = peft_call_reason(self, args, kwargs, dora_ok=False)
    if why is None:
        why = runtime_reason(x, base, self.lora_A[a].weight, self.lora_B[a].weight, self.lora_dropout[a], amp)
    if why is not None:
        return hand_back(self, why, x, args, kwargs)
    drop = self.lora_dropout[a]
    y = qlora_linear(x, base, self.lora_A[a].weight, self.lora_B[a].weight, st.scale(self.scaling[a], x.device),
                     _dropout_p(drop)[0] if drop.training else 0.0, drop.training)
    if _TRACING:
        _tracing.record(self, None, st.name)
    return y


__all__ = ["peft_kind", "peft_reason", "runtime_reason", "predicted_fallbacks", "peft_forward", "REPACKED"]
