"""DoraLinear: a Linear layer with a DoRA adapter (PEFT ``use_dora=True``), over ``fastlora.ops.dora``."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import amp as _amp
from ..core import tracing as _tracing
from ..core.tracing import ACTIVE as _TRACING
from ..ops.dora import dora_linear, weight_norm
from .lora import _INT_VIEW, LoraLinear, base_layout


class DoraLinear(LoraLinear):
    """Linear layer with a DoRA adapter (PEFT ``use_dora=True``), forward through ``dora_linear``.

    Parameters as ``LoraLinear`` (weight, bias, lora_A, lora_B) plus ``lora_magnitude_vector`` (N,) — PEFT's
    name — initialised as PEFT does to ‖W0 + s·B·A‖ per output row (= ‖W0‖ with B = 0), in the adapter dtype.
    ``merge()`` writes W0 ← (m/n)⊙(W0 + s·B·A) with n = ‖W0 + s·B·A‖ of the unmerged W0 (PEFT's merge); ``unmerge()``
    divides m/n back out and subtracts s·B·A, then restores the elements whose rounding did not come back, so W0
    is bit-exact after any number of cycles (as long as W0, A, B and m are not modified while merged).
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, bias: bool = True, fan_in_fan_out: bool = False,
                 use_rslora: bool = False, merge_weights: bool = True, init: str = "kaiming",
                 adapter_dtype: torch.dtype | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, bias, fan_in_fan_out,
                         use_rslora, merge_weights, init, adapter_dtype, device, dtype)
        self.reset_magnitude()

    @classmethod
    def from_linear(cls, layer: nn.Module, r: int, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    use_rslora: bool = False, merge_weights: bool = True, init: str = "kaiming",
                    adapter_dtype: torch.dtype | None = None) -> "DoraLinear":
        """Wrap an nn.Linear or transformers Conv1D, sharing (never copying) its weight and bias."""
        base_layout(layer, "DoraLinear.from_linear")       # quantized bases are not served by DoRA here
        self = super().from_linear(layer, r, lora_alpha, lora_dropout, use_rslora, merge_weights, init,
                                   adapter_dtype)
        self.reset_magnitude()
        return self

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← ‖W0 + s·B·A‖ per output row (PEFT's DoRA initialisation), in lora_A's dtype."""
        n = weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling, self.fan_in_fan_out)
        m = n.to(self.lora_A.dtype)
        if "lora_magnitude_vector" in self._parameters:
            self.lora_magnitude_vector.copy_(m)
        else:
            self.lora_magnitude_vector = nn.Parameter(m)

    def forward(self, x: Tensor) -> Tensor:
        if _TRACING:
            _tracing.record(self, _tracing.MERGED if self.merged else None)
        if self.merged:
            return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        return _amp.call(dora_linear, _amp.autocast_dtype(x), x, self.weight, self.bias, self.lora_A, self.lora_B,
                         self.lora_magnitude_vector, self.scale_arg(), self.lora_dropout, self.training,
                         self.fan_in_fan_out)

    def _versions(self):
        return super()._versions() + (self.lora_magnitude_vector._version,)

    def _factor(self, hi, norm):
        """m/n shaped to multiply W0's rows (its columns when fan_in_fan_out)."""
        f = self.lora_magnitude_vector.detach().to(hi) / norm
        return f[None, :] if self.fan_in_fan_out else f[:, None]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W0 ← (m/n)⊙(W0 + s·B·A), formed in float32 (float64 for a float32 W0), rounded once. ``safe_merge``:
        a non-finite result raises ValueError and W0 is left unchanged."""
        if self.merged:
            warnings.warn("DoraLinear: already merged, nothing to do")
            return
        w = self.weight
        hi = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32
        delta = self.delta_weight(hi)
        full = w.to(hi) + delta
        norm = torch.linalg.vector_norm(full, dim=0 if self.fan_in_fan_out else 1)   # of the unmerged W0
        new = (self._factor(hi, norm) * full).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("DoraLinear: merging the adapter gives non-finite weights (the adapter seems "
                             "broken); the base weight was left unchanged")
        back = (new.to(hi) / self._factor(hi, norm) - delta).to(w.dtype)
        iv = _INT_VIEW[w.dtype]
        idx = (back.view(iv) != w.view(iv)).flatten().nonzero().squeeze(1)
        vals = w.flatten()[idx].clone()
        w.copy_(new)
        self._merge_fix = (idx, vals, self._versions(), norm)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W/(m/n) − s·B·A with the n kept at merge (PEFT's unmerge), then the exact bytes restored."""
        if not self.merged:
            warnings.warn("DoraLinear: already unmerged, nothing to do")
            return
        w = self.weight
        hi = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32
        idx, vals, versions, norm = self._merge_fix
        back = (w.to(hi) / self._factor(hi, norm) - self.delta_weight(hi)).to(w.dtype)
        if versions == self._versions():
            back.view(-1)[idx] = vals
        w.copy_(back)
        self._merge_fix, self.merged = None, False


__all__ = ["DoraLinear"]
