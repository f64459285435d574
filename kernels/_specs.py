"""What `python -m fastlora.inspect` compiles: one CompileSpec per shipped kernel config.

A spec describes a *typical real launch*, specialised the way Triton's JIT specialises one: integer
arguments equal to 1 become constexprs (unit strides), integers and pointers divisible by 16 carry
``tt.divisibility = 16``. Compiling without that information gives code no real launch would run
(unvectorised loads, per-element 64-bit address math, spurious register spills).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    name: str                 # human-readable, e.g. "lora_expand x=bf16 ab=bf16/tf32 64x128 w4 s2 r16"
    fn: object                # the @triton.jit function (not the autotuner)
    signature: dict           # arg name -> triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict          # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    targets: tuple = field(default=(80, 90))   # compute capabilities to compile for
    attrs: dict = field(default_factory=dict)  # {(arg index,): [["tt.divisibility", 16]]}


def specialize(fn, meta: dict, pointers: dict, values: dict, floats=()) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for a launch of ``fn`` with meta-parameters ``meta``, pointer
    element types ``pointers`` (name -> "bf16"...; assumed 16-byte aligned, as torch allocates) and
    integer argument ``values`` (name -> int, as a typical launch passes them); ``floats`` names fp32
    scalars. Mirrors triton.runtime.jit's specialisation (== 1 -> constexpr, % 16 == 0 -> divisible)."""
    sig, consts, attrs = {}, dict(meta), {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            v = values[name]
            if v == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs
