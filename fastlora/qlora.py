"""QLoRA: LoRA over a bitsandbytes 4-bit (Linear4bit, NF4 / FP4) or 8-bit (Linear8bitLt) base layer.

    y = x·deq(W)ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ

``deq`` is bitsandbytes' own routine (``bnb.functional.dequantize_4bit`` /
``int8_vectorwise_dequant``, what PEFT's ``dequantize_bnb_weight`` calls); fastlora has no codec
of its own. The dequantized (N, K) weight lives only inside one forward (handed to the fused op,
then dropped) and is rebuilt in backward: it is never saved for backward, so at most one layer's
full-precision weight exists at a time. Saved for backward: x, S = dropout(x)·Aᵀ (M, r), A, B and
the 0-d scale / seed, as for ``fastlora.lora_linear`` (plus, on the torch backend with dropout, the
mask bit-packed, as ops.LoraFunction does).

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

import math
import numbers
import sys

import torch
from torch import Tensor, nn

from . import _amp, ops
from . import patching as _patching
from . import tracing as _tracing
from .backend import select_backend
from .dropout import draw_packed, unpack_mask
from .functional import check_inputs, op_scalars
from .modules import LoraLinear, check_rank
from .patching import _ATTR, _dropout_p, _peft_active, peft_adapter_reason
from .tracing import ACTIVE as _TRACING

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


class _QLoraFunction(torch.autograd.Function):
    """Fused LoRA linear whose base weight is dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scale, seed, layer, dtype, p, deterministic, backend):
        keep = bits = None
        if p > 0 and backend == "torch" and x.device.type == "cpu":   # as ops.LoraFunction: the CPU torch path
            K = x.shape[-1]                                             # keeps its mask bit-packed (M·K/8 bytes)
            keep, bits = draw_packed(seed, x.numel() // K, K, p, lora_A.dtype)
        w = dequantize(layer, dtype)
        y, S = ops.forward(x, w, bias, lora_A, lora_B, scale, p, seed, False, True, backend, keep)
        del w, keep
        ctx.save_for_backward(x, lora_A, lora_B, S, scale, seed, bits)
        ctx.layer, ctx.dtype, ctx.p, ctx.deterministic, ctx.backend = layer, dtype, p, deterministic, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return ops.own_output(y)

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, S, scale, seed, bits = ctx.saved_tensors
        nx, nb, na, nbb = (ctx.needs_input_grad[i] for i in range(4))
        keep = None if bits is None else unpack_mask(bits, x.shape[-1], lora_A.dtype)
        w = dequantize(ctx.layer, ctx.dtype)
        dx, dA, dB, dbias, _ = ops.backward(dy.contiguous(), x, w, lora_A, lora_B, S, scale, ctx.p, seed, False,
                                            nx, na, nbb, nb, False, ctx.deterministic, ctx.backend, keep)
        del w
        return (dx, dbias.to(ctx.bias_dtype) if nb else None, dA, dB, None, None, None, None, None, None, None)


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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        return _QLoraFunction.apply(x, bias, lora_A, lora_B, scale, seed_t, base_layer, cd, p, bool(deterministic),
                                    backend)
    w = dequantize(base_layer, cd)                                # inference: nothing saved
    y, _ = ops.forward(x, w, bias, lora_A, lora_B, scale, p, seed_t, False, False, backend)
    return y


# ---------------------------------------------------------------------------- PEFT (fastlora.patch)

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
        return _patching.DROPOUT_1
    if packed_for_cpu(base):
        return REPACKED
    if not (x.device == A.device == base.weight.device):
        return f"x on {x.device}, the layer on {base.weight.device}"
    if A.dtype != B.dtype:
        return f"adapter dtypes lora_A {A.dtype}, lora_B {B.dtype}"
    cd = compute_dtype(base, x)
    if amp is not None:
        if not _amp.servable(amp, x, A, B, base.bias):
            return _patching.amp_reason(amp, x, A, B, base.bias)
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
    why, a = _patching.peft_call_reason(self, args, kwargs, dora_ok=False)
    if why is None:
        why = runtime_reason(x, base, self.lora_A[a].weight, self.lora_B[a].weight, self.lora_dropout[a], amp)
    if why is not None:
        return _patching.hand_back(self, why, x, args, kwargs)
    drop = self.lora_dropout[a]
    y = qlora_linear(x, base, self.lora_A[a].weight, self.lora_B[a].weight, st.scale(self.scaling[a], x.device),
                     _dropout_p(drop)[0] if drop.training else 0.0, drop.training)
    if _TRACING:
        _tracing.record(self, None, st.name)
    return y


# ---------------------------------------------------------------------------- module

class QLoraLinear(LoraLinear):
    """LoraLinear over a quantized bitsandbytes base layer (kept as the submodule ``base_layer``).

    Built by ``LoraLinear.from_linear(bnb_layer, r=...)``. State dict: the base layer's own keys
    under ``base_layer.`` (bnb's quant-state entries included) plus ``lora_A`` / ``lora_B``.
    Adapters default to float32 (PEFT's QLoRA default). merge() is not offered: merging into a
    quantized weight would re-quantize it, which is lossy.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("QLoraLinear wraps an existing quantized layer: use "
                        "fastlora.LoraLinear.from_linear(bnb_layer, r=...)")

    @classmethod
    def from_quantized(cls, layer: nn.Module, r: int, lora_alpha: float = 1, lora_dropout: float = 0.0,
                       use_rslora: bool = False, init: str = "kaiming",
                       adapter_dtype: torch.dtype | None = None) -> "QLoraLinear":
        where = "LoraLinear.from_linear"
        why = base_reason(layer)
        if why is not None:
            raise TypeError(f"{where}: layer: {why}")
        k, n = layer.in_features, layer.out_features
        r = check_rank(r, k, n, where)
        if not isinstance(lora_dropout, numbers.Real) or not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"{where}: lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
            raise ValueError(f"{where}: lora_alpha must be a finite number, got {lora_alpha!r}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"{where}: init must be one of ('kaiming', 'gaussian'), got {init!r}")
        dtype = adapter_dtype or torch.float32
        if dtype not in _COMPUTE:
            raise TypeError(f"{where}: adapter_dtype must be float32, float16 or bfloat16, got {dtype}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = layer
        self.in_features, self.out_features, self.r, self.lora_alpha = k, n, r, lora_alpha
        self.use_rslora, self.lora_dropout = bool(use_rslora), float(lora_dropout)
        self.fan_in_fan_out, self.merge_weights, self.merged = False, False, False
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        kw = dict(device=layer.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(r, k, **kw))
        self.lora_B = nn.Parameter(torch.empty(n, r, **kw))
        self._merge_fix = None
        self.reset_lora_parameters(init)
        return self

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        if _TRACING:
            _tracing.record(self)
        return qlora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scale_arg(),
                            self.lora_dropout, self.training)

    def merge(self, safe_merge: bool = False) -> None:
        raise NotImplementedError("QLoraLinear: merging into a quantized base weight is not supported "
                                  "(it would re-quantize W0, a lossy change); dequantize the model first")

    def unmerge(self) -> None:
        raise NotImplementedError("QLoraLinear: never merged (merge is not supported on a quantized base)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={quant_kind(self.base_layer)}"


__all__ = ["qlora_linear", "QLoraLinear", "dequantize", "quant_kind", "compute_dtype"]
