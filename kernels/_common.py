"""Pieces shared by the LoRA kernels: jit helpers (dropout mask, mixed-dtype MMA); the interpreter's bf16 fix."""
from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------


@triton.jit
def _keep(seed, rows, col0, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dropout keep-mask (BLOCK_M, BLOCK_K) for x seen as (M, K), columns col0 .. col0 + BLOCK_K − 1
    (col0 a multiple of 4). One Philox call per 4 columns: counter row·⌈K/4⌉ + col // 4, word col % 4.

    Bit-identical to fastlora.core.dropout.keep_mask; regenerated wherever needed, never stored.
    """
    counters = rows.to(tl.int64)[:, None] * ((K + 3) // 4) + (col0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    # interleave so column 4j + i takes word i of counter j
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_K))
    return u >= p


@triton.jit
def _mma(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc += a·b, accumulated in acc's dtype (fp32; fp64 for fp64 inputs). Equal dtypes go to the
    tensor cores as they are; mixed operands (fp32 adapters or fp32 S on a half base) are both
    promoted to acc's dtype."""
    if a.dtype == b.dtype:
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision=FP32_PRECISION)


# ---------------------------------------------------------------------------
# launcher helpers (tile configs and dot precision: kernels/policy.py)
# ---------------------------------------------------------------------------


from ._env import interpreting  # noqa: E402 - the one reader of TRITON_INTERPRET

if interpreting():   # bf16 dots are wrong in the stock interpreter (every kernel module imports this one)
    from ._interpreter import patch_bf16_dot
    patch_bf16_dot()
