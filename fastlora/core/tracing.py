"""What runs is what the user is told: ``fastlora.trace()`` and ``fastlora.FallbackWarning`` (fastlora.core.tracing).

    with fastlora.trace() as t:
        model(**batch).loss.backward()
    print(t)          # one row per layer: fused calls, fall-backs and their reasons
    t.fused           # forward calls that ran a fused op
    t.fallbacks       # reason -> calls handed to the layer's own (PEFT / loralib) forward
    t.layers          # layer name -> LayerCounts(fused, fallbacks)

Every layer ``fastlora.patch`` patched and every fastlora module (LoraLinear, MergedLoraLinear, DoraLinear,
QLoraLinear, MultiLoraLinear) reports each forward call here. A patched layer's name is its module path at
patch time (the report's); a fastlora module's is its path in ``trace(model)``'s model, else its class name
and the order it first ran in (``LoraLinear#0``). With no trace open a call costs one check of the list
``ACTIVE``; calls that torch.compile traces into a graph are not counted (they run the fused op's custom op).

A fall-back — a patched layer handing a call to its library's forward — also warns, once per layer and reason,
with ``FallbackWarning`` (a UserWarning: ``warnings.filterwarnings("ignore", category=fastlora.FallbackWarning)``),
whether or not a trace is open. Calls with no adapter to run (merged weights, PEFT's adapters disabled) are
counted under their reason but do not warn: the user asked for exactly that.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

# Reasons for calls that have no adapter to run: counted by a trace, never warned about.
MERGED = "merged (the adapter is in the base weight)"
DISABLED = "adapters disabled"
QUIET = frozenset((MERGED, DISABLED))


class FallbackWarning(UserWarning):
    """A fastlora layer ran its library's own forward instead of the fused op (or ``patch`` left a LoRA
    layer unpatched): the message names the layer and the reason."""


@dataclass
class LayerCounts:
    """One layer's calls: ``fused`` forward calls, and ``fallbacks`` (reason -> count)."""
    fused: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)


class Trace:
    """The calls recorded while a ``fastlora.trace()`` block was open (see the module docstring)."""

    def __init__(self, model: nn.Module | None = None):
        self._model_names = {} if model is None else {id(m): n or "<root>" for n, m in model.named_modules()}
        self._by_module: dict[int, tuple[str, LayerCounts]] = {}
        self._unnamed: dict[str, int] = {}

    def _counts(self, module: nn.Module, name: str | None) -> LayerCounts:
        entry = self._by_module.get(id(module))
        if entry is None:
            if name is None:
                name = self._model_names.get(id(module))
            if name is None:
                cls = type(module).__name__
                k = self._unnamed[cls] = self._unnamed.get(cls, -1) + 1
                name = f"{cls}#{k}"
            entry = self._by_module[id(module)] = (name or "<root>", LayerCounts())
        return entry[1]

    @property
    def layers(self) -> dict[str, LayerCounts]:
        """Layer name -> its counts, in the order the layers first ran (layers sharing a name are summed)."""
        out: dict[str, LayerCounts] = {}
        for name, c in self._by_module.values():
            tot = out.setdefault(name, LayerCounts())
            tot.fused += c.fused
            for why, n in c.fallbacks.items():
                tot.fallbacks[why] = tot.fallbacks.get(why, 0) + n
        return out

    @property
    def fused(self) -> int:
        """Forward calls that ran a fused op."""
        return sum(c.fused for _, c in self._by_module.values())

    @property
    def fallbacks(self) -> dict[str, int]:
        """Reason -> forward calls handed to the layer's own forward for it."""
        out: dict[str, int] = {}
        for _, c in self._by_module.values():
            for why, n in c.fallbacks.items():
                out[why] = out.get(why, 0) + n
        return out

    def __str__(self) -> str:
        layers = self.layers
        fb = sum(self.fallbacks.values())
        lines = [f"fastlora.trace: {self.fused} fused call(s), {fb} fall-back(s), {len(layers)} layer(s)"]
        width = max((len(n) for n in layers), default=5)
        lines.append(f"  {'layer':<{width}}  {'fused':>6}  fall-backs")
        for name, c in layers.items():
            why = "; ".join(f"{r}: {n}" for r, n in c.fallbacks.items()) or "-"
            lines.append(f"  {name:<{width}}  {c.fused:>6}  {why}")
        return "\n".join(lines)

    __repr__ = __str__


ACTIVE: list[Trace] = []   # the open traces, innermost last; empty: tracing is off (one check per call)


@contextlib.contextmanager
def trace(model: nn.Module | None = None) -> Iterator[Trace]:
    """Record every fused call and fall-back of fastlora's layers inside the block (see the module docstring).

    ``model`` (optional) names fastlora modules by their path in it; patched layers are named by ``patch``.
    Blocks may nest: each records what ran inside it."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    t = Trace(model)
    ACTIVE.append(t)
    try:
        yield t
    finally:
        ACTIVE.remove(t)


def record(module: nn.Module, reason: str | None = None, name: str | None = None) -> None:
    """Count one forward call of ``module`` in every open trace: fused (``reason`` None) or a fall-back.
    Callers check ``ACTIVE`` first (so that tracing off costs one check)."""
    if torch.compiler.is_compiling():
        return
    for t in ACTIVE:
        c = t._counts(module, name)
        if reason is None:
            c.fused += 1
        else:
            c.fallbacks[reason] = c.fallbacks.get(reason, 0) + 1


def fall_back(module: nn.Module, name: str, warned: set, reason: str, library: str = "PEFT") -> None:
    """A call of ``module`` (module path ``name``) goes to its library's forward for ``reason``: warn once per
    layer and reason (``warned`` is the layer's set of reasons already warned about), count it if tracing."""
    if ACTIVE:
        record(module, reason, name)
    if reason in QUIET or reason in warned or torch.compiler.is_compiling():
        return
    warned.add(reason)
    warnings.warn(f"fastlora: {name or '<root>'} runs {library}'s own forward, not the fused op: {reason} "
                  f"(warned once per layer and reason; fastlora.trace() counts every call)",
                  FallbackWarning, stacklevel=3)


__all__ = ["trace", "Trace", "LayerCounts", "FallbackWarning", "record", "fall_back", "ACTIVE"]
