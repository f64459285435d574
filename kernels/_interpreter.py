"""Workarounds for two Triton interpreter bfloat16 gaps (TRITON_INTERPRET=1 only; GPU code untouched).

The interpreter stores bfloat16 as uint16 and (triton 3.9):
1. its ``create_dot`` multiplies those bit patterns (triton-lang/triton#11584, closed as "not
   supported yet"). We convert bf16 dot operands to float32 first — exact, a bf16 value is the top
   half of an fp32 — which is what tensor cores compute for bf16 inputs with fp32 accumulation;
2. its fp32 -> bf16 cast truncates, while the GPU's cvt.rn.bf16.f32 rounds to nearest even.
   We round to nearest even, so interpreted kernels round like compiled ones.
"""
from __future__ import annotations

import numpy as np
import triton.language as tl


def patch_bf16_dot() -> None:
    from triton.runtime import interpreter as itp

    builder = itp.InterpreterBuilder
    if getattr(builder.create_dot, "_fastlora_bf16", False):
        return
    original = builder.create_dot

    def to_fp32(h):
        if h.dtype == tl.bfloat16:
            return itp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a, b = to_fp32(a), to_fp32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, np.uint16(0x7FC0), rounded)
            return itp.TensorHandle(rounded, dst_type.scalar)
        return original_cast(self, src, dst_type)

    create_dot._fastlora_bf16 = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
