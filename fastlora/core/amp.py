"""torch.autocast (AMP) for the fused op: the operand casts F.linear gets from autocast, done before the call.

Inside an autocast region, ``F.linear(x, W, b)`` (and the matmuls PEFT / loralib run for the adapter,
``lora_B(lora_A(dropout(x)))``) casts every floating operand to the autocast dtype and returns that
dtype. ``call`` does the same for the fused op: x, W, bias, lora_A and lora_B are cast to the autocast
dtype (differentiably: fp32 adapters get their gradients back in fp32, as under autocast), and the op runs
with autocast disabled on the already-cast tensors. fp32 adapters thus compute in the autocast dtype,
exactly as PEFT's lora_A / lora_B nn.Linear do under autocast. Outside autocast nothing is cast.
"""
from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)   # what autocast casts (never float64)


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype an autocast region active on x's device runs linear layers in; None outside autocast."""
    if not isinstance(x, Tensor):
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def servable(dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """Can the fused op serve this autocast region: a half autocast dtype, and operands autocast would cast."""
    return dtype in _HALF and all(t is None or t.dtype in _CASTABLE for t in tensors)


def call(fn, dtype: torch.dtype | None, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
         lora_B: Tensor, *args, **kwargs):
    """fn(x, weight, bias, lora_A, lora_B, *args, **kwargs) with autocast's semantics when ``dtype`` is an
    autocast dtype the op serves (see the module docstring); a plain call otherwise."""
    if dtype is None or not servable(dtype, x, weight, bias, lora_A, lora_B):
        return fn(x, weight, bias, lora_A, lora_B, *args, **kwargs)
    x, weight, bias, lora_A, lora_B = (None if t is None else t.to(dtype) for t in (x, weight, bias, lora_A, lora_B))
    with torch.autocast(x.device.type, enabled=False):
        return fn(x, weight, bias, lora_A, lora_B, *args, **kwargs)
