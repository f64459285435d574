"""Adapter layers as the LoRA paper benchmarks them (Hu et al. 2021, §5.1 and Table 1).

* AdapterH (Houlsby et al. 2019): two adapters per Transformer block, one after the
  attention module and one after the MLP module, each before the block's residual
  connection. Here: the output of ``attn.c_proj`` and of ``mlp.c_proj`` goes through an
  adapter ``h + up(act(down(h)))``.
* AdapterL (Lin et al. 2020): one adapter per block, after the MLP module, preceded by
  its own (trainable) LayerNorm: ``h + up(act(down(LN(h))))`` on ``mlp.c_proj``'s output.

Shapes: h (..., d); down: Linear(d, r) with bias; up: Linear(r, d) with bias; r is the
bottleneck. Parameter count, the paper's formula:

    |Θ| = L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d

with L̂_Adpt adapter layers and L̂_LN trainable LayerNorms (AdapterL: one per adapter;
AdapterH: none added — Houlsby et al. also fine-tune the base model's LayerNorms, which
adds parameters but no latency, so they are not counted here).

The paper does not state r for Table 1; ``bottleneck_for`` derives it from the |Θ| of
each column (the r whose |Θ| is closest to the published one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Adapter(nn.Module):
    """Bottleneck adapter with its own residual: h + up(act(down(LN(h)))) (LN optional).

    h (..., d) -> (..., d). ``zero_init=True`` zeroes ``up`` so the adapter starts as the
    identity (Houlsby et al.'s near-identity initialisation, made exact).
    """

    def __init__(self, d: int, r: int, layer_norm: bool = False, zero_init: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if r < 1 or d < 1:
            raise ValueError(f"Adapter needs d >= 1 and bottleneck r >= 1, got d={d}, r={r}")
        kw = dict(dtype=dtype, device=device)
        self.ln = nn.LayerNorm(d, **kw) if layer_norm else None
        self.down = nn.Linear(d, r, **kw)
        self.act = nn.GELU()
        self.up = nn.Linear(r, d, **kw)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.ln(h) if self.ln is not None else h
        return h + self.up(self.act(self.down(z)))


class WithAdapter(nn.Module):
    """``adapter(module(x))``: places an adapter on a sub-module's output (e.g. GPT-2's c_proj)."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.module(x))


@dataclass(frozen=True)
class AdapterSpec:
    kind: str          # "H" or "L"
    per_block: int     # adapter layers per Transformer block
    ln_per_adapter: int  # trainable LayerNorms per adapter layer


SPECS = {"H": AdapterSpec("H", per_block=2, ln_per_adapter=0),
         "L": AdapterSpec("L", per_block=1, ln_per_adapter=1)}


def _spec(kind: str) -> AdapterSpec:
    if kind not in SPECS:
        raise ValueError(f"adapter kind must be one of {sorted(SPECS)}, got {kind!r}")
    return SPECS[kind]


def paper_param_count(kind: str, n_layer: int, d: int, r: int) -> int:
    """|Θ| from the paper's formula for ``n_layer`` Transformer blocks of width ``d``, bottleneck r."""
    s = _spec(kind)
    n_adpt = s.per_block * n_layer
    n_ln = s.ln_per_adapter * n_adpt
    return n_adpt * (2 * d * r + r + d) + 2 * n_ln * d


def bottleneck_for(kind: str, n_layer: int, d: int, target_params: float) -> int:
    """The bottleneck r >= 1 whose paper-formula |Θ| is closest to ``target_params``."""
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    s = _spec(kind)
    n_adpt = s.per_block * n_layer
    fixed = paper_param_count(kind, n_layer, d, 0)
    r_real = (target_params - fixed) / (n_adpt * (2 * d + 1))
    candidates = {max(1, int(r_real)), max(1, int(r_real) + 1)}
    return min(sorted(candidates), key=lambda r: abs(paper_param_count(kind, n_layer, d, r) - target_params))


def add_adapters(model: nn.Module, kind: str, r: int, zero_init: bool = False) -> list[Adapter]:
    """Insert adapters into a transformers GPT-2 model (GPT2Model or GPT2LMHeadModel) in place.

    Returns the adapters added, in block order. AdapterH wraps ``attn.c_proj`` and
    ``mlp.c_proj`` of every block; AdapterL wraps ``mlp.c_proj`` with a LayerNorm'ed adapter.
    """
    s = _spec(kind)
    blocks = model.transformer.h if hasattr(model, "transformer") else model.h
    p = next(model.parameters())
    added = []
    for block in blocks:
        targets = [block.attn, block.mlp] if s.kind == "H" else [block.mlp]
        for parent in targets:
            d = parent.c_proj.nf              # Conv1D output features
            a = Adapter(d, r, layer_norm=s.ln_per_adapter > 0, zero_init=zero_init,
                        dtype=p.dtype, device=p.device)
            parent.c_proj = WithAdapter(parent.c_proj, a)
            added.append(a)
    return added


def adapter_param_count(adapters: list[Adapter]) -> int:
    """Parameters actually held by the inserted adapters (to check against the paper's formula)."""
    return sum(p.numel() for a in adapters for p in a.parameters())
