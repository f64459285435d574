"""fastlora.kernels: Triton kernels and their thin launchers (tensors in, tensors out).

Nothing here imports fastlora (data flows one way: fastlora -> kernels).
Every kernel module exposes ``compile_specs()``: the (kernel, signature, constexprs,
launch options) of every shipped config, which ``python -m fastlora.inspect`` compiles
for sm_80 and sm_90 without a GPU.
"""
from ._common import interpreting  # noqa: E402

if interpreting():   # bf16 dots are wrong in the stock interpreter; see _interpreter.py
    from ._interpreter import patch_bf16_dot
    patch_bf16_dot()

from .linear_bwd import lora_bwd  # noqa: E402,F401
from .linear_fwd import lora_fwd  # noqa: E402,F401
