"""LoRA dropout masks: the Triton kernels' counter-based Philox mask, and the CPU torch path's torch.rand mask.

Triton kernels (GPU; CPU under TRITON_INTERPRET=1): a mask is a pure function of (seed, row, col) of x seen
as a 2-D (M, K) matrix. One Philox-4x32 call yields four 32-bit words, so each call serves four
neighbouring columns: element (m, k) is kept when

    u = uniform(philox(seed, counter = m * ceil(K / 4) + k // 4)[k % 4]) >= p.

``keep_mask`` is the pure-torch statement of that function. It replays exactly what
``triton.language.rand4x(seed, counter)`` computes (Philox-4x32, 10 rounds, int64 counters split into two
32-bit words, each output word turned into a float in [0, 1)): the tests' oracle for the kernels' mask, and
the mask of torch code on a GPU (DoRA's torch GEMMs, a forced torch backend), which reads the seed tensor on
the device, never on the host. The kernels regenerate it in backward and never store it.

Torch code on the CPU (the pure-torch backend, DoRA, QLoRA, the multi-adapter torch path) draws its mask the
way nn.Dropout does, from torch's generator: ``torch_keep_mask``, u = torch.rand(M, K) ≥ p — one draw per
element instead of ~120 int64 tensor ops of the Philox replica. Without a seed it uses torch's default
generator (torch.manual_seed makes a run repeatable, as PEFT's); with one, a generator seeded with it (same
seed, same mask). So the CPU and GPU masks differ for the same seed (as PEFT's nn.Dropout masks do); both
keep each element with probability 1 − p, independently. Eager training keeps the CPU mask bit-packed for
backward (``draw_packed`` / ``unpack_mask``, 1/32 of an fp32 x), never a dropped copy of x.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

# Philox-4x32 constants (Salmon et al. 2011), as in triton/language/random.py.
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_N_ROUNDS = 10
# Largest float32 s with (2**31 - 1) * s < 1 after rounding (Triton's constant).
_UINT_TO_UNIFORM = 4.6566127342e-10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of constant a and uint32 tensor b (held in int64).

    a·b < 2**64: one int64 multiply keeps all 64 bits (two's-complement wrap-around past 2**63), the
    arithmetic shift and the 32-bit mask then read the high word exactly.
    """
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def _philox4(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 output words (held in int64) of Philox-4x32-10 at int64 counters ``offsets``."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64)
    else:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _fold(w: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 2**31) fold (int32 bit pattern x, ~x where x < 0) = min(w, 2**32 - 1 - w)."""
    return torch.minimum(w, _MASK32 - w)


def philox_uniform4(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), shape (*offsets.shape, 4), for int64 counters ``offsets``;
    equals ``tl.rand4x(seed, offsets)`` stacked on the last dim (word 0 is ``tl.rand``).

    ``seed`` is a Python int or a 0-d integer tensor (read on its device, no host sync).
    """
    words = torch.stack(_philox4(seed, offsets), dim=-1)
    return _fold(words).to(torch.float32) * torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32)


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) for int64 ``offsets``; equals ``tl.rand(seed, offsets)``."""
    return philox_uniform4(seed, offsets)[..., 0]


@functools.lru_cache(maxsize=64)
def _threshold(p: float) -> int:
    """Smallest folded word v with float32(v)·scale >= float32(p), so that  u >= p  <=>  v >= threshold.

    u = fl(fl(v)·scale) is monotone in v, so the keep decision can be made on integers. Host-side
    float32 scalars (numpy), no tensor is read.
    """
    scale, pf = np.float32(_UINT_TO_UNIFORM), np.float32(p)
    lo, hi = 0, 2**31          # hi = 2**31: no word is kept (p >= 1, excluded by the op's checks)
    while lo < hi:
        mid = (lo + hi) // 2
        if np.float32(mid) * scale >= pf:
            hi = mid
        else:
            lo = mid + 1
    return lo


# Counters per slab of rows, per intra-op thread: the ~120 int64 tensor ops of Philox's ten rounds then work on
# cache-sized tensors (several times faster than one pass on a CPU; figures in docs/benchmarks.md). The GPU kernels
# draw in registers.
_SLAB_COUNTERS = 1 << 15


def keep_mask(seed: int | torch.Tensor, M: int, K: int, p: float | torch.Tensor, device=None) -> torch.Tensor:
    """The Triton kernels' boolean (M, K) keep-mask of LoRA dropout with probability ``p`` (True = kept).

    ``p`` may also be a float32 tensor (M,) of per-row probabilities on ``device`` (multi-adapter: each token
    its adapter's p); row m is then kept where u ≥ p[m], the same uniforms u compared as floats (as the kernels
    do; nothing is read on the host)."""
    K4 = -(-K // 4)
    per_row = isinstance(p, torch.Tensor)
    if per_row:
        p_rows = p.to(device=device, dtype=torch.float32)[:, None]
        scale = torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32, device=device)
    else:
        t = _threshold(p)
    keep = torch.empty((M, K4, 4), dtype=torch.bool, device=device)
    cols = torch.arange(K4, device=device, dtype=torch.int64)
    step = max(1, _SLAB_COUNTERS * torch.get_num_threads() // max(K4, 1))
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        counters = torch.arange(r0, r1, device=device, dtype=torch.int64)[:, None] * K4 + cols[None, :]
        for i, w in enumerate(_philox4(seed, counters)):
            if per_row:
                torch.ge(_fold(w).to(torch.float32) * scale, p_rows[r0:r1], out=keep[r0:r1, :, i])
            else:
                torch.ge(_fold(w), t, out=keep[r0:r1, :, i])
    return keep.reshape(M, 4 * K4)[:, :K]


def new_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh 31-bit seed as a 0-d int64 tensor drawn on ``device`` by torch's generator there.

    It respects torch.manual_seed, needs no host sync and traces under torch.compile.
    """
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)


# ---------------------------------------------------------------------------
# the CPU torch path's mask: torch's generator, kept bit-packed for backward
# ---------------------------------------------------------------------------

def _uniforms(seed, M: int, K: int, device) -> torch.Tensor:
    """u = torch.rand(M, K) (float32) from torch's generator on ``device``: the default one (seed None), or a fresh
    one seeded with ``seed`` (an int or a 0-d integer tensor, read on the host). The CPU generator (mt19937) keeps
    32 bits of a seed, so a 64-bit seed is folded to its low word xor its high word (seeds < 2**32 as they are)."""
    if seed is None:
        return torch.rand(M, K, device=device)
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    gen = torch.Generator(device=device)
    gen.manual_seed((s ^ (s >> 32)) & 0xFFFFFFFF)
    return torch.rand(M, K, generator=gen, device=device)


def torch_keep_mask(seed: int | torch.Tensor | None, M: int, K: int, p: float | torch.Tensor, device=None,
                    dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(M, K) keep mask of torch code on the CPU: u ≥ p with u = torch.rand(M, K) (float32) drawn by torch's
    generator; in ``dtype``: bool, or 1/0 in a float dtype (a factor for the GEMM operands).

    ``seed`` None: torch's default generator, as nn.Dropout (torch.manual_seed makes it repeatable); else a
    generator seeded with it: the same seed gives the same mask (see _uniforms). ``p``: a float, or a float32
    (M,) tensor of per-row probabilities (multi-adapter)."""
    u = _uniforms(seed, M, K, device)
    if isinstance(p, torch.Tensor):
        p = p[:, None]
    if dtype is torch.bool:
        return torch.ge(u, p)
    u.ge_(p)                                          # 1.0 / 0.0 in place
    return u if dtype is torch.float32 else u.to(dtype)


def draw_keep(seed: torch.Tensor | None, M: int, K: int, p: float | torch.Tensor, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """The (M, K) 1/0 keep mask in ``dtype`` that fastlora's torch code applies: on the CPU torch's generator
    (``torch_keep_mask``; ``seed`` None: the default generator); on other devices the kernels' Philox mask
    (``keep_mask``, the seed tensor read on the device: no host sync)."""
    if device.type == "cpu":
        return torch_keep_mask(seed, M, K, p, device, dtype)
    return keep_mask(seed, M, K, p, device).to(dtype)


# Bits for backward, on the CPU: numpy's packbits / unpackbits (torch has no bit-packing op; a CPU tensor and a numpy
# array share memory); faster than torch ops (a bit-weight matrix-vector product to pack, a (256, 8) table lookup to
# unpack) at every size measured (docs/benchmarks.md).
_NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def draw_packed(seed: torch.Tensor | None, M: int, K: int, p: float, dtype: torch.dtype):
    """CPU: (keep, bits) from one draw: keep = torch_keep_mask(seed, M, K, p, dtype=dtype) and its bits, uint8
    (M, ⌈K/8⌉) with bit j of byte c = keep[:, 8c + j] (1/32 of an fp32 x), what eager training keeps for backward."""
    u = _uniforms(seed, M, K, "cpu")
    bits = torch.from_numpy(np.packbits(u.numpy() >= np.float32(p), axis=-1, bitorder="little"))
    u.ge_(p)                                          # the same float32 comparison, 1.0 / 0.0 in place
    return (u if dtype is torch.float32 else u.to(dtype)), bits


def unpack_mask(bits: torch.Tensor, K: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The (M, K) mask of draw_packed's bits, in ``dtype`` (bool, or 1/0 in a float dtype). CPU."""
    u8 = np.unpackbits(bits.numpy(), axis=-1, count=K, bitorder="little")
    npd = _NP_FLOAT.get(dtype)
    if npd is not None:
        return torch.from_numpy(u8.astype(npd))
    t = torch.from_numpy(u8)
    return t.view(torch.bool) if dtype is torch.bool else t.to(dtype)
