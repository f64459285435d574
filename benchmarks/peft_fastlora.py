"""Run a PEFT LoRA model's ``lora.Linear`` layers through ``fastlora.lora_linear``.

A small local stand-in for ``fastlora.patch`` (the modules engineer's integration):
``patch(model)`` uses ``fastlora.patch`` when the package provides one, otherwise it
replaces each PEFT ``lora.Linear``'s ``forward`` with a call to the fused op using the
layer's own tensors — base weight (N, K), or (K, N) for GPT-2's Conv1D
(``fan_in_fan_out``), bias (N,), lora_A.weight (r, K), lora_B.weight (N, r), scaling and
dropout p. Layers in a state the fused op does not cover (merged, adapters disabled,
several active adapters, a LoRA variant such as DoRA, per-call adapter_names) keep
PEFT's own forward, so the patched model always computes what PEFT would.
"""
from __future__ import annotations

import types

import torch
from torch import nn

import fastlora


def _peft_lora_linear_cls():
    from peft.tuners.lora.layer import Linear
    return Linear


def _fused_forward(layer, backend):
    orig = layer.forward

    def forward(x: torch.Tensor, *args, **kwargs):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
                or active[0] in getattr(layer, "lora_variant", {})):
            return orig(x, *args, **kwargs)
        name = active[0]
        base = layer.get_base_layer()
        drop = layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        if x.dtype != base.weight.dtype:
            x = x.to(base.weight.dtype)
        return fastlora.lora_linear(x, base.weight, base.bias, A, B, float(layer.scaling[name]),
                                    dropout_p=p, training=layer.training,
                                    fan_in_fan_out=bool(layer.fan_in_fan_out), backend=backend)

    return forward


def patch(model: nn.Module, backend: str | None = None) -> int:
    """Route every PEFT ``lora.Linear`` in ``model`` through fastlora, in place.

    ``backend`` ("triton"/"torch"/None) is passed to ``fastlora.lora_linear`` by the local
    wrapper (``fastlora.patch``, when present, takes no backend and is used only when
    ``backend`` is None). Returns the number of layers patched; a model with none is an error.
    """
    if backend is None and hasattr(fastlora, "patch"):
        fastlora.patch(model)
        n = sum(1 for m in model.modules() if isinstance(m, _peft_lora_linear_cls()))
    else:
        cls = _peft_lora_linear_cls()
        n = 0
        for m in model.modules():
            if isinstance(m, cls) and "forward" not in m.__dict__:
                m.forward = _fused_forward(m, backend)
                n += 1
    if n == 0:
        raise ValueError("model has no PEFT lora.Linear layer to patch (is it a PEFT LoRA model?)")
    return n


def unpatch(model: nn.Module) -> None:
    """Undo ``patch``: every layer gets PEFT's own forward back."""
    if hasattr(fastlora, "unpatch"):
        fastlora.unpatch(model)
    for m in model.modules():
        if isinstance(m, _peft_lora_linear_cls()) and isinstance(m.__dict__.get("forward"), types.FunctionType):
            del m.forward
