"""Two rules every launcher and every op shares, written once (no Triton import: fastlora.core.checks re-exports
them for the ops).

    weight_nk(W, fan_in_fan_out)   W0 as (N, K): a transposed view of a GPT-2 Conv1D weight stored (K, N)
    acc_dtype(dtype)               the accumulator / S / partial-buffer dtype: float32, float64 for float64 data
"""
from __future__ import annotations

import torch


def weight_nk(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W0 as (N, K): a transposed view of a GPT-2 Conv1D weight stored (K, N) (and back: the same transpose)."""
    return weight.t() if fan_in_fan_out else weight


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator / S / partial-buffer dtype of a launch or op on ``dtype`` data: float32, float64 for
    float64 (gradcheck, oracles)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
