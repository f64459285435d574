"""PEFT DoRA layers (``use_dora=True``) through ``fastlora.ops.dora.dora_linear``: fastlora.patch hands them here."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core import amp as _amp
from ..ops.dora import dora_linear

_HALF = (torch.float16, torch.bfloat16)


def is_peft_dora(layer, adapter: str) -> bool:
    """True when ``adapter`` of a PEFT lora.Linear is a DoRA adapter (PEFT's DoraLinearVariant)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return variant is not None and type(variant).__name__ == "DoraLinearVariant" \
        and adapter in getattr(layer, "lora_magnitude_vector", {})


def peft_dora_args(layer, adapter: str):
    """(weight, bias, lora_A, lora_B, magnitude) of a PEFT DoRA lora.Linear's adapter, or None when the tensors'
    dtypes are ones dora_linear refuses (the caller then hands the call to PEFT's own forward)."""
    base = layer.get_base_layer()
    w, A, B = base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    m = layer.lora_magnitude_vector[adapter].weight
    ok = (w.dtype,) + ((torch.float32,) if w.dtype in _HALF else ())
    if A.dtype != B.dtype or A.dtype not in ok or m.dtype not in ok:
        return None
    return w, base.bias, A, B, m


def peft_dora_forward(layer, x: Tensor, adapter: str, scale, dropout_p: float, amp=None) -> Tensor | None:
    """PEFT's lora.Linear forward for one active DoRA adapter, through ``dora_linear``; None if it cannot serve.
    ``amp``: the dtype of the torch.autocast region the call runs in (None outside): x, W0, bias, A and B are cast
    to it as F.linear and PEFT's lora_A / lora_B would be (fastlora.core.amp); the magnitude stays as it is (PEFT
    divides it by the norm elementwise, which autocast does not cast).

    Dropout as PEFT's DoraLinearVariant: applied only when the layer and its dropout module are training."""
    args = peft_dora_args(layer, adapter)
    if args is None or not isinstance(x, Tensor) or (amp is None and x.dtype != args[0].dtype):
        return None
    w, bias, A, B, m = args
    drop = layer.lora_dropout[adapter]
    training = bool(layer.training and getattr(drop, "training", False))
    return _amp.call(dora_linear, amp, x, w, bias, A, B, m, scale, dropout_p if training else 0.0, training,
                     layer.fan_in_fan_out)


__all__ = ["is_peft_dora", "peft_dora_args", "peft_dora_forward"]
