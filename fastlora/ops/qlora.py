"""QLoRA: LoRA over a bitsandbytes 4-bit (Linear4bit, NF4 / FP4) or 8-bit (Linear8bitLt) base layer.

    y = x·deq(W)ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ

``deq`` is bitsandbytes' own routine (``bnb.functional.dequantize_4bit`` /
``int8_vectorwise_dequant``, what PEFT's ``dequantize_bnb_weight`` calls); fastlora has no codec
of its own. QLoRA is the LoRA op itself (fastlora.ops.lora.LoraFunction) with a weight source instead of a weight:
the dequantized (N, K) weight lives only inside one forward (handed to the fused op, then dropped) and is
rebuilt in backward: it is never saved for backward, so at most one layer's full-precision weight exists at a
time. Saved for backward: x, S = dropout(x)·Aᵀ (M, r), A, B and the 0-d scale / seed, as for
``fastlora.lora_linear`` (plus, on the torch backend with dropout, the mask bit-packed).

Dtypes follow bitsandbytes and PEFT: a 4-bit layer computes in its ``compute_dtype``
(bnb_4bit_compute_dtype; when unset, bnb takes x's dtype for float32 / bfloat16 input), x is cast to
it and the result cast back to x's dtype; an 8-bit layer computes in x's dtype. Adapters may be
float32 on a half compute dtype (PEFT's default) or the compute dtype itself.

The usual QLoRA recipe (prepare_model_for_kbit_training casts norms and embeddings to float32, so float32 x
reaches a bf16 / fp16-compute layer with float32 adapters) runs as ONE op with mixed dtypes, as PEFT computes it:
the base GEMM and bias in the compute dtype on x cast to it (a temporary, as in bitsandbytes), the LoRA branch
in float32 on x itself (the shrink reads float32 x; only x is saved, no rounded copy), y = the base result in
float32 plus the LoRA term; dx = (dY in the compute dtype)·W in the compute dtype plus the LoRA term in float32.
Inside ``torch.autocast`` every matmul runs in the autocast dtype, as bitsandbytes' F.linear and PEFT's adapter
nn.Linear do there: x, bias, A and B are cast to it (differentiably) and the weight dequantized to it; a 4-bit
layer's result comes back in x's dtype (bitsandbytes casts it back), an 8-bit layer's in the autocast dtype.

8-bit note: bitsandbytes' own 8-bit forward dequantizes the weight during CPU training, but in
inference (and on GPUs) it quantizes the activations to int8 too (LLM.int8()); fastlora always
computes x·deq(W)ᵀ, the float64-oracle maths, so eval outputs differ from bnb's by its int8
activation rounding.

    y = fastlora.qlora_linear(x, bnb_layer, lora_A, lora_B, scaling, dropout_p, training)
    fastlora.patch(peft_qlora_model)            # serves peft's lora.bnb.Linear4bit / Linear8bitLt
    fastlora.LoraLinear.from_linear(bnb_layer, r=16)   # -> QLoraLinear
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor, nn

from ..core import amp as _amp
from ..core.backend import select_backend
from ..core.checks import check_inputs, op_scalars
from . import lora

_COMPUTE = (torch.float32, torch.float16, torch.bfloat16)


def _bnb():
    """bitsandbytes if it is already imported (a model holding bnb layers has imported it), else None."""
    return sys.modules.get("bitsandbytes")


def quant_kind(layer) -> str | None:
    """"4bit" for a bnb Linear4bit, "8bit" for a Linear8bitLt, None for anything else."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def _scb(layer):
    """The 8-bit row scales: on the weight until bnb's first forward moves them to layer.state."""
    scb = getattr(layer.state, "SCB", None)
    return scb if scb is not None else getattr(layer.weight, "SCB", None)


def base_reason(layer) -> str | None:
    """Why this bnb layer cannot be served (None if it can). Reads, never changes, the layer."""
    kind = quant_kind(layer)
    if kind is None:
        return f"base layer is {type(layer).__name__}, not a bitsandbytes Linear4bit / Linear8bitLt"
    w = layer.weight
    if kind == "4bit":
        qs = getattr(w, "quant_state", None)
        if type(w).__name__ != "Params4bit" or qs is None:
            return "Linear4bit weight is not quantized yet (no quant_state: move it to its device first)"
        if tuple(qs.shape) != (layer.out_features, layer.in_features):
            return f"Linear4bit quant_state.shape {tuple(qs.shape)} is not (out_features, in_features)"
    else:
        if getattr(layer.state, "has_fp16_weights", False) or w.dtype != torch.int8:
            return "Linear8bitLt holds float weights (has_fp16_weights=True), not int8"
        if _scb(layer) is None:
            return "Linear8bitLt has no row scales (SCB): weight not quantized yet"
    return None


def packed_for_cpu(layer) -> bool:
    """bnb >= 0.49 repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel at its first eval
    forward (no grad); dequantize_4bit does not read that layout, so such a layer is handed back."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def compute_dtype(layer, x: Tensor) -> torch.dtype:
    """The dtype bnb computes this layer in for input x (without setting it on the layer as bnb does)."""
    if quant_kind(layer) == "8bit":
        return x.dtype
    cd = layer.compute_dtype
    if not getattr(layer, "compute_type_is_set", True) and x.dtype in (torch.float32, torch.bfloat16):
        cd = x.dtype
    return cd if cd is not None else x.dtype


def dequantize(layer, dtype: torch.dtype) -> Tensor:
    """The (N, K) base weight in ``dtype``, by bitsandbytes' own dequantization. A fresh tensor."""
    bnb = _bnb()
    if quant_kind(layer) == "4bit":
        if packed_for_cpu(layer):
            raise RuntimeError("fastlora: this Linear4bit weight was repacked by bitsandbytes for its CPU "
                               "inference kernel; call layer.state_dict() or move it to restore the layout")
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        w = bnb.functional.int8_vectorwise_dequant(layer.weight.data, _scb(layer).to(layer.weight.device))
    return w if w.dtype == dtype else w.to(dtype)


def qlora_linear(x: Tensor, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float | Tensor,
                 dropout_p: float = 0.0, training: bool = True, *, seed: int | Tensor | None = None,
                 backend: str | None = None, deterministic: bool | None = None) -> Tensor:
    """y = x·deq(W)ᵀ + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ over a bitsandbytes base layer.

    Args:
        x: (..., in_features). The base GEMM runs in the layer's compute dtype on x cast to it, as bitsandbytes
            computes; the LoRA branch on x itself when x is float32 with float32 adapters on a half compute dtype
            (the QLoRA recipe, as PEFT computes), else on x cast to the compute dtype. The result comes back in
            x's dtype (inside torch.autocast: the module docstring).
        base_layer: a quantized bnb.nn.Linear4bit or Linear8bitLt (its weight and bias are used,
            never modified; the base weight gets no gradient, its bias does if it requires one).
        lora_A (r, K), lora_B (N, r): the compute dtype, or float32 on a half compute dtype.
        scaling, dropout_p, training, seed, backend, deterministic: as ``fastlora.lora_linear``.
    """
    why = base_reason(base_layer)
    if why is not None:
        raise TypeError(f"base_layer: {why}")
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    bias = base_layer.bias
    eight = quant_kind(base_layer) == "8bit"
    amp = _amp.autocast_dtype(x)
    if amp is not None and _amp.servable(amp, x, bias, lora_A, lora_B):
        # torch.autocast: bitsandbytes' F.linear and PEFT's adapter matmuls all run in the autocast dtype; a 4-bit
        # layer casts its result back to x's dtype, an 8-bit one returns the autocast dtype
        bias = None if bias is None else (bias if eight else bias.to(compute_dtype(base_layer, x))).to(amp)
        with torch.autocast(x.device.type, enabled=False):
            y = _qlora(x.to(amp), base_layer, bias, lora_A.to(amp), lora_B.to(amp), scaling, dropout_p, training,
                       seed, backend, deterministic, amp)
        return y if eight else y.to(x.dtype)
    cd = compute_dtype(base_layer, x)
    if cd not in _COMPUTE:
        raise TypeError(f"x: the layer computes in {cd}; bitsandbytes dequantizes to float32, float16 or bfloat16")
    bias = None if bias is None else bias.to(cd)                  # bnb adds the bias in the compute dtype
    if recipe(x, cd, lora_A):                                     # float32 x, fp32 adapters, half compute dtype
        return _qlora(x, base_layer, bias, lora_A, lora_B, scaling, dropout_p, training, seed, backend,
                      deterministic, cd)
    return _qlora(x.to(cd), base_layer, bias, lora_A, lora_B, scaling, dropout_p, training, seed, backend,
                  deterministic, cd).to(x.dtype)


def recipe(x: Tensor, cd: torch.dtype, lora_A: Tensor) -> bool:
    """The usual QLoRA recipe's mixed dtypes (prepare_model_for_kbit_training: float32 activations, float32
    adapters, a bf16 / fp16 compute dtype): one op with the base in ``cd`` and the LoRA branch in float32."""
    return x.dtype == torch.float32 and cd in (torch.float16, torch.bfloat16) and lora_A.dtype == torch.float32


def _qlora(x, base_layer, bias, lora_A, lora_B, scaling, dropout_p, training, seed, backend, deterministic, cd):
    """The op on validated dtypes: the base weight dequantized to ``cd`` (x's dtype, or a half ``cd`` under
    float32 x: the QLoRA recipe), bias in ``cd``; y in x's dtype."""
    n, k = base_layer.out_features, base_layer.in_features
    stand_in = x.new_empty(()).expand(n, k)                       # shape / dtype / device only, no memory
    check_inputs(x, stand_in, None, lora_A, lora_B, scaling, dropout_p, False)
    backend = select_backend(x.device, backend)
    p, scale, seed_t = op_scalars(x, scaling, dropout_p, training, seed, host_rng=backend == "torch"
                                  and x.device.type == "cpu" and not torch.compiler.is_compiling())
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if torch.compiler.is_compiling():
        # torch.compile traces the registered LoRA op on the dequantized weight (which it then saves for backward:
        # a source cannot cross the op's schema); bitsandbytes' dequantize runs where torch.compile puts it
        y, _ = lora.lora_linear_fwd(x, dequantize(base_layer, cd), bias, lora_A, lora_B, scale, p, seed_t, False,
                                    torch.is_grad_enabled(), bool(deterministic), backend)
        return y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        # the LoRA op itself, its weight a source: dequantized in forward and again in backward, never saved
        return lora.LoraFunction.apply(x, functools.partial(dequantize, base_layer, cd), bias, lora_A, lora_B,
                                       (scale, p, seed_t, False, bool(deterministic), backend))
    w = dequantize(base_layer, cd)                                # inference: nothing saved
    y, _ = lora.forward(x, w, bias, lora_A, lora_B, scale, p, seed_t, False, False, backend)
    return y


__all__ = ["qlora_linear", "dequantize", "quant_kind", "compute_dtype", "base_reason", "packed_for_cpu",
           "recipe"]
