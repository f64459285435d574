"""The one place that decides which backend runs a fused LoRA op.

    CUDA tensors                         -> "triton" (compiled kernels)
    CPU tensors with TRITON_INTERPRET=1  -> "triton" (the same kernels, interpreted)
    CPU tensors otherwise                -> "torch"  (fastlora.ops.<op>, the readable maths)

An override — the ``backend=`` argument, else the FASTLORA_BACKEND environment
variable — forces "triton" or "torch". The environment is read at every call, by kernels/_env.py (the one
reader of TRITON_INTERPRET for the kernels and for this choice). An impossible choice is an error, never a
silent fallback.
"""
from __future__ import annotations

import torch

from ..kernels._env import env as _env, interpreting     # the one reader of the environment (kernels/_env.py)

BACKENDS = ("auto", "triton", "torch")


def resolve_backend_choice(override: str | None = None) -> str:
    """The requested backend: the argument if given, else FASTLORA_BACKEND, else "auto"."""
    choice = override if override is not None else _env("FASTLORA_BACKEND", "auto")
    if choice not in BACKENDS:
        src = "backend" if override is not None else "FASTLORA_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {choice!r}")
    return choice


def select_backend(device: torch.device, override: str | None = None) -> str:
    """"triton" or "torch" for tensors on ``device`` (``override``: a choice in BACKENDS, else FASTLORA_BACKEND)."""
    choice = resolve_backend_choice(override)
    if choice == "torch":
        return choice
    kind = device.type
    triton_ok = kind == "cuda" or (kind == "cpu" and interpreting())
    if choice == "auto":
        return "triton" if triton_ok else "torch"
    if choice == "triton" and not triton_ok:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}")
    return choice
