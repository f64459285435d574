"""The one place that decides which backend runs a fused LoRA op.

    CUDA tensors                         -> "triton" (compiled kernels)
    CPU tensors with TRITON_INTERPRET=1  -> "triton" (the same kernels, interpreted)
    CPU tensors otherwise                -> "torch"  (fastlora.reference, the readable maths)

An override — the ``backend=`` argument, else the FASTLORA_BACKEND environment
variable — forces "triton" or "torch". An impossible choice is an error, never a
silent fallback.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


_POSIX = os.name == "posix"


def _env(name: str, default: str) -> str:
    """os.environ.get(name, default), read at every call. On POSIX from the mapping's own dict of bytes:
    os.environ.get of an unset variable raises and catches KeyError twice (0.7 µs alone, several times that
    measured inside a layer call)."""
    data = getattr(os.environ, "_data", None)
    if not _POSIX or type(data) is not dict or torch.compiler.is_compiling():
        return os.environ.get(name, default)
    v = data.get(name.encode())
    return default if v is None else v.decode()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return _env("TRITON_INTERPRET", "0") not in ("", "0")


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
