"""torch API differences across the supported torch versions (no Triton, no fastlora imports).

torch's fp32 matmul precision for CUDA:
    new API (torch >= 2.9):  torch.backends.cuda.matmul.fp32_precision  "ieee" | "tf32" | "none"
                             ("none" = inherit torch.backends.fp32_precision; "none" there = ieee)
    old API:                 torch.backends.cuda.matmul.allow_tf32      bool

Where the new API exists, reading the old attribute is deprecated, and after the new API was used it
raises RuntimeError ("mix of the legacy and new APIs"), so code must read the new one there.
"""
from __future__ import annotations

import contextlib

import torch

_MODES = ("ieee", "tf32")


def _has_new_api() -> bool:
    try:
        torch.backends.cuda.matmul.fp32_precision  # noqa: B018 - attribute probe
    except AttributeError:
        return False
    return True


def cuda_matmul_allows_tf32() -> bool:
    """True when torch lets CUDA fp32 matmuls use TF32 (what cuBLAS would do for an fp32 GEMM).

    Reads ``torch.backends.cuda.matmul.fp32_precision`` where it exists ("none" resolved through the
    global ``torch.backends.fp32_precision``), ``torch.backends.cuda.matmul.allow_tf32`` otherwise.
    """
    mm = torch.backends.cuda.matmul
    if not _has_new_api():
        return bool(mm.allow_tf32)
    mode = mm.fp32_precision
    if mode == "none":
        mode = getattr(torch.backends, "fp32_precision", "none")
    return mode == "tf32"


@contextlib.contextmanager
def cuda_matmul_tf32(allow: bool):
    """Within the block, CUDA fp32 matmuls may use TF32 iff ``allow``; the previous setting comes back after.

    Sets the new API where it exists (never mixing in the old one), the old attribute otherwise.
    """
    if not isinstance(allow, bool):
        raise TypeError(f"allow must be a bool, got {type(allow).__name__}")
    mm = torch.backends.cuda.matmul
    new = _has_new_api()
    name = "fp32_precision" if new else "allow_tf32"
    before = getattr(mm, name)
    setattr(mm, name, _MODES[allow] if new else allow)
    try:
        yield
    finally:
        setattr(mm, name, before)


__all__ = ["cuda_matmul_allows_tf32", "cuda_matmul_tf32"]
