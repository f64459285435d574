"""The environment, read in one place (no Triton import here: fastlora.core.backend reads it too).

    interpreting()     True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)
    env(name, default) os.environ.get, fast: read at every call, never cached, never written
"""
from __future__ import annotations

import os

import torch

_POSIX = os.name == "posix"


def env(name: str, default: str) -> str:
    """os.environ.get(name, default), read at every call. On POSIX from the mapping's own dict of bytes:
    os.environ.get of an unset variable raises and catches KeyError twice, a host cost paid on every layer call
    (figures: docs/benchmarks.md)."""
    data = getattr(os.environ, "_data", None)
    if not _POSIX or type(data) is not dict or torch.compiler.is_compiling():
        return os.environ.get(name, default)
    v = data.get(name.encode())
    return default if v is None else v.decode()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return env("TRITON_INTERPRET", "0") not in ("", "0")
