"""A spy on every Triton kernel launch: the ``launches`` fixture records each launch's kernel name, its keyword
arguments (the meta-parameters: FP32_PRECISION, ATOMIC, BLOCK_*, ...) and whether the kernel's source uses atomics.

It wraps the ``run`` method of every Triton kernel class (``KernelInterface`` and its subclasses: JIT, interpreted,
autotuned), so it holds whatever the kernels and launchers are called and however a launcher reaches them.
Used by tests/ops/test_deterministic_launch.py (which launches use atomics) and tests/kernels/test_launch_choices.py (which
precision each launch receives).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
from triton.runtime.jit import KernelInterface


@dataclass
class Launch:
    kernel: str
    meta: dict
    uses_atomics: bool


def _kernel_function(obj):
    """The Python function behind a JIT / interpreted / autotuned kernel object."""
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def _subclasses(cls):
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel launch during the test, in order (an autotuner's launch and the launch of the
    kernel it picks are both recorded)."""
    seen: list[Launch] = []
    for cls in set(_subclasses(KernelInterface)):
        if "run" not in vars(cls):
            continue

        def run(self, *args, _orig=vars(cls)["run"], **kwargs):
            if not kwargs.get("warmup", False):
                fn = _kernel_function(self)
                seen.append(Launch(fn.__name__, kwargs, "atomic_" in inspect.getsource(fn)))
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    return seen
