"""LoRA nn.Modules whose forward is the fused op ``fastlora.lora_linear`` (``fastlora.ops.lora``).

    LoraLinear        y = x·W0ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ            (loralib ``Linear``)
    QLoraLinear       LoraLinear over a bitsandbytes 4-bit / 8-bit base  (``fastlora.ops.qlora``)
    MergedLoraLinear  the same with LoRA on some output slices only      (loralib ``MergedLinear``,
                      e.g. GPT-2 ``c_attn`` with enable_lora=[True, False, True])

Shapes (loralib / PEFT names, so state dicts match loralib's):
    weight  (N, K), or (K, N) when ``fan_in_fan_out`` (GPT-2 Conv1D), frozen
    bias    (N,) or None
    lora_A  (r, K)            MergedLoraLinear: (r·G, K), G = sum(enable_lora)
    lora_B  (N, r)            MergedLoraLinear: (N/len(enable_lora)·G, r)
    s = scaling = lora_alpha / r   (lora_alpha / √r with use_rslora)

Merging: ``merge()`` writes W0 ← round(W0 + s·B·A) in place (ΔW and the sum formed in float32 for
a half W0, in float64 for a float32 W0, and rounded once), after which forward is a plain GEMM. ``unmerge()`` subtracts the
same delta in the same precision and then restores, bit for bit, the few elements whose rounding
did not come back (their indices and original values are kept at merge time), so any number of
merge/unmerge cycles leaves W0 exactly as it was, as long as W0, A and B are not modified while
merged (checked through their version counters; if they were, unmerge just subtracts the delta,
as PEFT and loralib do).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import amp as _amp
from ..core import tracing as _tracing
from ..core.checks import is_conv1d
from ..core.tracing import ACTIVE as _TRACING
from ..ops.lora import _lora_linear, lora_linear
from ..ops.qlora import _COMPUTE, base_reason, qlora_linear, quant_kind

_INITS = ("kaiming", "gaussian")
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def check_rank(r, in_features: int, out_features: int, where: str = "LoraLinear") -> int:
    """r must be an int in [1, min(in_features, out_features)]; else an error naming ``where``."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{where}: r must be an int, got {type(r).__name__}")
    hi = min(in_features, out_features)
    if not 1 <= r <= hi:
        raise ValueError(f"{where}: r must be in [1, min(in_features, out_features)] = [1, {hi}] "
                         f"(in_features={in_features}, out_features={out_features}), got r={r}")
    return int(r)


def base_layout(layer: nn.Module, where: str = "layer"):
    """(weight, bias, in_features, out_features, fan_in_fan_out) of an nn.Linear or a transformers Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias, layer.in_features, layer.out_features, False
    if is_conv1d(layer):
        return layer.weight, layer.bias, layer.weight.shape[0], layer.weight.shape[1], True
    raise TypeError(f"{where}: expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def block_lora_B(lora_B: Tensor, groups: int, rows: Tensor, out_features: int) -> Tensor:
    """loralib MergedLinear's stacked lora_B (per·G, r) -> the (N, r·G) B the fused op sees.

    Block g of lora_B (rows g·per … (g+1)·per) lands on output rows ``rows[g·per:(g+1)·per]``
    and columns g·r … (g+1)·r; everything else is zero. Differentiable (index_copy).
    """
    blocks = torch.block_diag(*lora_B.split(lora_B.shape[0] // groups))           # (per·G, r·G)
    return blocks.new_zeros(out_features, blocks.shape[1]).index_copy(0, rows, blocks)


def _own_params(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out):
    """lora_linear on a module's own parameters (their shapes, dtypes and the settings were checked when it was
    built, and .to() moves them together): only x is checked per call; anything else takes lora_linear's full
    checks, so a bad x still gets its error naming the argument."""
    if (isinstance(x, Tensor) and x.dtype is weight.dtype and x.ndim and x.shape[-1] == lora_A.shape[1]
            and x.device == weight.device):
        return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)


class _LoraBase(nn.Module):
    """Shared state, forward and merge logic; subclasses define the LoRA factors' shapes."""

    def _setup(self, weight: Tensor, bias, in_features, out_features, r, lora_alpha, lora_dropout,
               fan_in_fan_out, use_rslora, merge_weights, init, adapter_dtype, lora_rows, name):
        if not isinstance(lora_dropout, numbers.Real) or not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"{name}: lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if init not in _INITS:
            raise ValueError(f"{name}: init must be one of {_INITS}, got {init!r}")
        if not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
            raise ValueError(f"{name}: lora_alpha must be a finite number, got {lora_alpha!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.fan_in_fan_out, self.merge_weights, self.merged = bool(fan_in_fan_out), bool(merge_weights), False
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        weight.requires_grad_(False)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.bias = bias
        a_rows, b_rows = lora_rows
        kw = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(a_rows, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(b_rows, r, **kw))
        self._merge_fix = None
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming"):
        """A like nn.Linear's default (kaiming-uniform, a=√5) or N(0, 1/r) for "gaussian"; B = 0."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- pieces subclasses provide ---------------------------------------------------------
    def lora_B_effective(self) -> Tensor:
        """The (N, rank) B the fused op sees (rank = lora_A.shape[0])."""
        return self.lora_B

    # -- forward ---------------------------------------------------------------------------
    def scale_arg(self) -> float:
        """``scaling`` as the fused op takes it: a float (the op keeps one cached 0-d tensor per value, so a
        call allocates nothing for it and reads no tensor to validate it)."""
        return float(self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (= the base weight's). Inside
        ``torch.autocast``: every operand cast to the autocast dtype, output in it (as nn.Linear)."""
        if _TRACING:
            _tracing.record(self, _tracing.MERGED if self.merged else None)
        if self.merged:
            return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        return _amp.call(_own_params, _amp.autocast_dtype(x), x, self.weight, self.bias, self.lora_A,
                         self.lora_B_effective(), self.scale_arg(), self.lora_dropout, self.training,
                         self.fan_in_fan_out)

    # -- merge -----------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """s·B·A computed in ``dtype`` (float32, or float64 when merging into a float32 W0), in the
        base weight's layout ((K, N) when fan_in_fan_out). Only merge/unmerge build this N×K tensor."""
        d = (self.lora_B_effective().detach().to(dtype) @ self.lora_A.detach().to(dtype)) * float(self.scaling)
        return d.t() if self.fan_in_fan_out else d

    def _versions(self):
        return (self.weight._version, self.lora_A._version, self.lora_B._version)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W0 ← round(W0 + s·B·A). With ``safe_merge`` a non-finite result raises ValueError, W0 untouched."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}: already merged, nothing to do")
            return
        w = self.weight
        hi = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32
        delta = self.delta_weight(hi)
        new = (w.to(hi) + delta).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"{type(self).__name__}: merging the adapter gives non-finite weights "
                             f"(the adapter seems broken); the base weight was left unchanged")
        back = (new.to(hi) - delta).to(w.dtype)
        iv = _INT_VIEW[w.dtype]
        idx = (back.view(iv) != w.view(iv)).flatten().nonzero().squeeze(1)
        if w.numel() < 2**31:
            idx = idx.to(torch.int32)        # typically ~10% of W0's elements: 6-8 bytes each
        vals = w.flatten()[idx].clone()
        w.copy_(new)
        self._merge_fix = (idx, vals, self._versions())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: restores W0's original bytes (see the module docstring)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}: already unmerged, nothing to do")
            return
        w = self.weight
        hi = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32
        back = (w.to(hi) - self.delta_weight(hi)).to(w.dtype)
        idx, vals, versions = self._merge_fix
        if versions == self._versions():
            back.view(-1)[idx] = vals
        w.copy_(back)
        self._merge_fix, self.merged = None, False

    def train(self, mode: bool = True):
        """loralib semantics when ``merge_weights``: eval() merges, train() unmerges."""
        super().train(mode)
        if self.merge_weights:
            if mode and self.merged:
                self.unmerge()
            elif not mode and not self.merged:
                self.merge()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, bias={self.bias is not None}, merged={self.merged}")


class LoraLinear(_LoraBase):
    """Linear layer with a LoRA adapter, forward through the fused op (drop-in for loralib ``Linear``).

    Args:
        in_features K, out_features N, r in [1, min(K, N)], lora_alpha (s = alpha/r, alpha/√r with
        use_rslora), lora_dropout p in [0, 1) on the adapter input (training only), bias, fan_in_fan_out
        (weight stored (K, N) like GPT-2's Conv1D), merge_weights (eval() merges, train() unmerges),
        init "kaiming" | "gaussian", adapter_dtype (default: weight's; float32 on a half base is allowed).
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, bias: bool = True, fan_in_fan_out: bool = False,
                 use_rslora: bool = False, merge_weights: bool = True, init: str = "kaiming",
                 adapter_dtype: torch.dtype | None = None, device=None, dtype=None):
        super().__init__()
        r = check_rank(r, in_features, out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        w = base.weight.data.t().contiguous() if fan_in_fan_out else base.weight.data
        self._setup(w, base.bias, in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out,
                    use_rslora, merge_weights, init, adapter_dtype, (r, out_features), "LoraLinear")

    @classmethod
    def from_linear(cls, layer: nn.Module, r: int, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    use_rslora: bool = False, merge_weights: bool = True, init: str = "kaiming",
                    adapter_dtype: torch.dtype | None = None) -> "LoraLinear":
        """Wrap an nn.Linear or transformers Conv1D, sharing (never copying) its weight and bias.

        The base weight is frozen (requires_grad=False), as in PEFT and loralib. A bitsandbytes
        Linear4bit / Linear8bitLt gives a ``fastlora.nn.lora.QLoraLinear`` (float32 adapters by default;
        merge_weights does not apply).
        """
        if quant_kind(layer) is not None:
            return QLoraLinear.from_quantized(layer, r, lora_alpha, lora_dropout, use_rslora, init, adapter_dtype)
        weight, bias, k, n, fifo = base_layout(layer, "LoraLinear.from_linear")
        r = check_rank(r, k, n, "LoraLinear.from_linear")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, bias, k, n, r, lora_alpha, lora_dropout, fifo, use_rslora, merge_weights,
                    init, adapter_dtype, (r, n), "LoraLinear.from_linear")
        return self


class MergedLoraLinear(_LoraBase):
    """loralib ``MergedLinear``: one fused projection (e.g. QKV) with LoRA on some output slices.

    ``enable_lora`` (length L, dividing N) marks which of the L equal output slices get an adapter;
    G = sum(enable_lora). Parameters keep loralib's names and shapes: lora_A (r·G, K) stacks the G
    A's, lora_B (N/L·G, r) stacks the G B's. The fused op sees rank r·G with a block-structured
    B (N, r·G) assembled from lora_B each forward (r·G columns, never an N×K ΔW): slice g of the
    output only reads the g-th r columns of S = dropout(x)·lora_Aᵀ.
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora=(True,), bias: bool = True,
                 fan_in_fan_out: bool = False, use_rslora: bool = False, merge_weights: bool = True,
                 init: str = "kaiming", adapter_dtype: torch.dtype | None = None, device=None, dtype=None):
        super().__init__()
        enable = self._check_enable(enable_lora, in_features, out_features, r, "MergedLoraLinear")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        w = base.weight.data.t().contiguous() if fan_in_fan_out else base.weight.data
        self._init_merged(w, base.bias, in_features, out_features, r, lora_alpha, lora_dropout, enable,
                          fan_in_fan_out, use_rslora, merge_weights, init, adapter_dtype)

    @classmethod
    def from_linear(cls, layer: nn.Module, r: int, enable_lora, lora_alpha: float = 1,
                    lora_dropout: float = 0.0, use_rslora: bool = False, merge_weights: bool = True,
                    init: str = "kaiming", adapter_dtype: torch.dtype | None = None) -> "MergedLoraLinear":
        """Wrap an nn.Linear or Conv1D (e.g. GPT-2 c_attn), sharing its weight and bias."""
        weight, bias, k, n, fifo = base_layout(layer, "MergedLoraLinear.from_linear")
        enable = cls._check_enable(enable_lora, k, n, r, "MergedLoraLinear.from_linear")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_merged(weight, bias, k, n, r, lora_alpha, lora_dropout, enable, fifo, use_rslora,
                          merge_weights, init, adapter_dtype)
        return self

    @staticmethod
    def _check_enable(enable_lora, in_features, out_features, r, where):
        enable = [bool(e) for e in enable_lora]
        if not enable or out_features % len(enable) != 0:
            raise ValueError(f"{where}: len(enable_lora) must divide out_features={out_features}, "
                             f"got enable_lora={list(enable_lora)}")
        if not any(enable):
            raise ValueError(f"{where}: enable_lora must enable at least one slice (use a plain layer "
                             f"otherwise), got {list(enable_lora)}")
        check_rank(r, in_features, out_features // len(enable), where)
        return enable

    def _init_merged(self, weight, bias, k, n, r, alpha, p, enable, fifo, rslora, mw, init, adapter_dtype):
        g, per = sum(enable), n // len(enable)
        self.enable_lora = enable
        self._setup(weight, bias, k, n, r, alpha, p, fifo, rslora, mw, init, adapter_dtype,
                    (r * g, per * g), "MergedLoraLinear")
        # Output rows that the stacked lora_B rows land on (loralib's lora_ind, as indices).
        self._rows = torch.cat([torch.arange(i * per, (i + 1) * per) for i, e in enumerate(enable) if e])

    def lora_B_effective(self) -> Tensor:
        """(N, r·G): block-diagonal stack of the G B's, rows placed on the enabled output slices."""
        if self._rows.device != self.lora_B.device:
            self._rows = self._rows.to(self.lora_B.device)
        return block_lora_B(self.lora_B, sum(self.enable_lora), self._rows, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", enable_lora={self.enable_lora}"


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
