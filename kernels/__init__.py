"""fastlora.kernels: Triton kernels and their thin launchers (tensors in, tensors out).

Nothing here imports fastlora (data flows one way: fastlora -> kernels).
Every kernel module exposes ``compile_specs()``: the (kernel, signature, constexprs,
launch options) of every shipped config, which ``python -m fastlora.inspect`` compiles
for sm_80 and sm_90 without a GPU.
"""
