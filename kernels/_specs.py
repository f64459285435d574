"""What `python -m fastlora.inspect` compiles: one CompileSpec per shipped kernel config."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    name: str                 # human-readable, e.g. "lora_fwd[one-launch] bf16 128x128x64 w8 s3"
    fn: object                # the @triton.jit function (not the autotuner)
    signature: dict           # arg name -> triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict          # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    targets: tuple = field(default=(80, 90))   # compute capabilities to compile for
