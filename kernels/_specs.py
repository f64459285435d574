"""What `python -m fastlora.inspect` compiles: one CompileSpec per shipped kernel config.

A spec describes a *typical real launch*, specialised the way Triton's JIT specialises one: integer
arguments equal to 1 become constexprs (unit strides), integers and pointers divisible by 16 carry
``tt.divisibility = 16``. Compiling without that information gives code no real launch would run
(unvectorised loads, per-element 64-bit address math, spurious register spills).

The configs come from the launch policy's tables (``shipped``: kernels/policy.py, the lists the launches choose
from), so the check compiles exactly what a GPU may run; the dtype pairs are the ones the ops accept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import policy

# (x dtype, adapter dtype, fp32 dot precision (policy.fp32_precision), precision of the gradient-feeding dots
# (policy.lora_precision)): half bases with half or fp32 adapters (tf32x3 there), fp32 with torch's default (ieee)
# and with tf32 allowed. tests/kernels/test_launch_choices.py checks these are the policy's answers.
SPEC_DTYPES = (("bf16", "bf16", "tf32", "tf32"), ("bf16", "fp32", "tf32", "tf32x3"), ("fp16", "fp16", "tf32", "tf32"),
               ("fp16", "fp32", "tf32", "tf32x3"), ("fp32", "fp32", "ieee", "ieee"), ("fp32", "fp32", "tf32", "tf32"))
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shipped(kernel: str, xdt: str, precision: str, dropout: bool = False) -> list[dict]:
    """The GPU configs a launch of ``kernel`` on ``xdt`` data with ``precision`` dots may use (never the
    interpreter's): policy.CANDIDATES at policy.tier."""
    return policy.CANDIDATES[kernel][policy.tier(kernel, TORCH_DTYPES[xdt], precision, dropout)]


def cfg_name(cfg: dict) -> str:
    """'64x128 w4 s2': a config's block sizes (in the table's order), warps and stages."""
    blocks = "x".join(str(v) for k, v in cfg.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{cfg['num_warps']} s{cfg['num_stages']}"


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
