"""LoraExperts: LoRA on the expert projections of a transformers experts module (``fastlora.ops.moe``)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from ..core import tracing as _tracing
from ..core.tracing import ACTIVE as _TRACING
from ..ops.moe import ExpertLora, experts_forward, experts_layout


class LoraExperts(nn.Module):
    """LoRA on the expert projections of a transformers experts module, with dropout (which PEFT's
    ParamWrapper refuses): ``forward(hidden_states, top_k_index, top_k_weights)`` as the experts module's.

    experts: e.g. ``model.model.layers[i].mlp.experts`` (Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE, gpt-oss …; its
    weights are frozen here). targets: the projections that get LoRA ("gate_up_proj" / "up_proj", "down_proj").
    lora_A[name] (E·r, in), lora_B[name] (out, E·r) in PEFT's ParamWrapper layout (B zero-initialised, A as
    PEFT's kaiming init), scaling = lora_alpha / r (√r with use_rslora). Dropout: each projection's input, per
    (slot, feature), fastlora.core.dropout's mask for the call's seed with slots in expert order; a fresh seed per call.
    Install it in place of the experts: ``block.experts = LoraExperts(block.experts, r=8)``.
    """

    def __init__(self, experts: nn.Module, r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 targets=("gate_up_proj", "down_proj"), use_rslora: bool = False, backend: str | None = None):
        super().__init__()
        why = experts_layout(experts)
        if why:
            raise TypeError(f"LoraExperts: {why}")
        first = "gate_up_proj" if experts.has_gate else "up_proj"
        bad = [t for t in targets if t not in (first, "down_proj")]
        if bad or not targets:
            raise ValueError(f"LoraExperts: targets must be a non-empty subset of {(first, 'down_proj')}, got "
                             f"{list(targets)}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoraExperts: r must be an int >= 1, got {r!r}")
        if not isinstance(lora_dropout, numbers.Real) or not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"LoraExperts: lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        self.experts = experts.requires_grad_(False)
        self.r, self.lora_alpha, self.lora_dropout, self.backend = r, float(lora_alpha), float(lora_dropout), backend
        self.scaling = lora_alpha / (r ** 0.5 if use_rslora else r)
        E = experts.num_experts
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in targets:
            w = getattr(experts, name)
            out_f, in_f = (w.shape[2], w.shape[1]) if experts.is_transposed else (w.shape[1], w.shape[2])
            A = torch.empty(E * r, in_f, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(A, a=5 ** 0.5)                  # nn.Linear's (and PEFT's) default for lora_A
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(out_f, E * r, dtype=w.dtype, device=w.device))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if _TRACING:
            _tracing.record(self)
        loras = {n: ExpertLora(self.lora_A[n], self.lora_B[n], self.scaling, self.lora_dropout) for n in self.lora_A}
        return experts_forward(self.experts, hidden_states, top_k_index, top_k_weights, loras,
                               training=self.training, backend=self.backend)


__all__ = ["LoraExperts"]
