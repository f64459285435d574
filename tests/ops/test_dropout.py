"""The LoRA dropout masks.

Triton kernels: Philox-4x32 keyed by (seed, row, col) of x seen as (M, K); one call per four columns:
u(m, k) = word k % 4 of philox(seed, counter = m·ceil(K/4) + k // 4). The CPU torch path: u = torch.rand(M, K)
from torch's generator (the default one, or one seeded with ``seed``), kept bit-packed for backward.

* fastlora.core.dropout.philox_uniform4 / philox_uniform (pure torch, the kernels' oracle) equal
  triton.language.rand4x / rand bit for bit (run here by the Triton interpreter, which executes tl.rand4x's
  own code), for 32- and 64-bit seeds and counters beyond 2**32 (the high counter word).
* Both masks keep each element with probability 1 − p (bounds stated below), uniformly and independently
  of neighbours and seeds; the torch mask is torch.rand's, repeatable by seed or torch.manual_seed.
* draw_packed's bits and unpack_mask round-trip the torch mask bit for bit (any K, any dtype).
* The fused op drops exactly its backend's mask (the kernels: keep_mask's; the torch path:
  torch_keep_mask's), in forward and in backward; the kernels keep an element whose uniform equals p (u ≥ p); p = 0 and
  training=False draw nothing.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fastlora import lora_linear
from fastlora.ops.bank import AdapterBank
from fastlora.core.dropout import draw_packed, keep_mask, philox_uniform, philox_uniform4, torch_keep_mask, unpack_mask
from fastlora.ops.multi import multi_lora_linear
from tests._replay import mask_of

# ---------------------------------------------------------------------------
# replica == tl.rand
# ---------------------------------------------------------------------------


@triton.jit
def _rand_kernel(seed_ptr, off_ptr, out_ptr, out4_ptr, n, BLOCK: tl.constexpr):
    """out[i] = tl.rand(seed, off[i]); out4[i, j] = tl.rand4x(seed, off[i])[j]. The seed is read from
    memory as an int64 and the counters are int64, as in the kernels."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    seed = tl.load(seed_ptr)
    off = tl.load(off_ptr + i, mask=m, other=0)
    tl.store(out_ptr + i, tl.rand(seed, off), mask=m)
    u0, u1, u2, u3 = tl.rand4x(seed, off)
    tl.store(out4_ptr + 4 * i, u0, mask=m)
    tl.store(out4_ptr + 4 * i + 1, u1, mask=m)
    tl.store(out4_ptr + 4 * i + 2, u2, mask=m)
    tl.store(out4_ptr + 4 * i + 3, u3, mask=m)


def _tl_rand(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tl.rand (n,), tl.rand4x (n, 4)) at int64 ``offsets``, computed by Triton (interpreted)."""
    out = torch.empty(offsets.shape, dtype=torch.float32)
    out4 = torch.empty((offsets.numel(), 4), dtype=torch.float32)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    _rand_kernel[(triton.cdiv(offsets.numel(), 256),)](seed_t, offsets, out, out4, offsets.numel(), BLOCK=256)
    return out, out4


def _bitwise_mismatches(got, expected, offsets):
    diff = (got.view(torch.int32) != expected.view(torch.int32)).reshape(len(offsets), -1).any(1).nonzero()
    if diff.numel() == 0:
        return ""
    i = diff[0, 0]
    return f"{diff.numel()} mismatches, first at offset {offsets[i].item()}: {got[i].tolist()} vs {expected[i].tolist()}"


SEEDS = [0, 1, 1234, 2**31 - 1, 2**32 + 5, 2**62 + 2**33 + 7, -1, -(2**40)]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_replica_equals_tl_rand_bitwise(seed):
    g = torch.Generator().manual_seed(0)
    offsets = torch.cat([
        torch.arange(0, 700, dtype=torch.int64),                                 # the usual small offsets
        torch.randint(0, 2**31, (300,), generator=g, dtype=torch.int64),
        torch.randint(2**32, 2**40, (300,), generator=g, dtype=torch.int64),     # high counter word used
        torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1], dtype=torch.int64),
    ])
    expected, expected4 = _tl_rand(seed, offsets)
    for s in (seed, torch.tensor(seed, dtype=torch.int64)):      # int and 0-d tensor seeds
        got, got4 = philox_uniform(s, offsets), philox_uniform4(s, offsets)
        assert got.dtype == got4.dtype == torch.float32 and got4.shape == (len(offsets), 4)
        assert not _bitwise_mismatches(got, expected, offsets), f"seed {seed}, rand: " + _bitwise_mismatches(got, expected, offsets)
        assert not _bitwise_mismatches(got4, expected4, offsets), f"seed {seed}, rand4x: " + _bitwise_mismatches(got4, expected4, offsets)
    assert (expected4 >= 0).all() and (expected4 < 1).all()


@pytest.mark.parametrize("K", [1, 4, 37])
def test_keep_mask_is_rand4x_at_row_major_counters(K):
    """keep(m, k) = rand4x(seed, m·ceil(K/4) + k // 4)[k % 4] >= p, computed by Triton itself."""
    M, p, seed = 13, 0.3, 99
    K4 = -(-K // 4)
    _, u4 = _tl_rand(seed, torch.arange(M * K4, dtype=torch.int64))
    u = u4.reshape(M, 4 * K4)[:, :K]
    assert torch.equal(keep_mask(seed, M, K, p), u >= p)


# ---------------------------------------------------------------------------
# statistics (both masks)
# ---------------------------------------------------------------------------

MASKS = {"philox": keep_mask, "torch": torch_keep_mask}


def _uniforms(kind, seed, n):
    """n uniforms of the mask ``kind`` for ``seed``, in the order the mask uses them."""
    if kind == "philox":
        return philox_uniform4(seed, torch.arange(n // 4, dtype=torch.int64)).reshape(-1)   # all 4 words
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_uniformity(kind, p):
    """Keep rate within 6 standard errors of 1 − p (a false alarm has probability ~2e-9 per check),
    for the whole mask and each of 8 row blocks; u uniform by a 64-bin chi-square test."""
    M, K, seed = 256, 512, 2024
    n = M * K
    keep = MASKS[kind](seed, M, K, p)
    assert keep.dtype == torch.bool and keep.shape == (M, K)
    se = math.sqrt(p * (1 - p) / n)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 6 * se, f"keep rate {rate:.5f}, expected {1 - p} ± {6 * se:.5f}"
    blocks = keep.reshape(8, -1).double().mean(1)                # each block: n / 8 draws
    assert ((blocks - (1 - p)).abs() < 6 * se * math.sqrt(8)).all(), blocks
    u = _uniforms(kind, seed, n)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    # chi-square with 63 dof: mean 63, sd sqrt(126) = 11.2; 63 + 6·11.2 = 130
    assert chi2 < 130, f"chi-square {chi2:.1f} over 64 bins"


@pytest.mark.parametrize("kind", MASKS)
def test_masks_of_neighbours_and_seeds_are_independent(kind):
    """Agreement of two independent masks is p² + (1 − p)²; adjacent columns (different words of one
    Philox call, and across calls), adjacent rows and two seeds must match that within 6 standard
    errors (a shifted or reused stream would not)."""
    M, K, p = 256, 256, 0.5
    mask = MASKS[kind]
    a = mask(7, M, K, p)
    expected = p * p + (1 - p) * (1 - p)
    pairs = {"next column": (a[:, 1:], a[:, :-1]), "column + 4": (a[:, 4:], a[:, :-4]), "next row": (a[1:], a[:-1]),
             "other seed": (a, mask(8, M, K, p)), "seed + 2**32": (a, mask(7 + 2**32, M, K, p))}
    for name, (u, v) in pairs.items():
        agree = (u == v).double().mean().item()
        se = math.sqrt(expected * (1 - expected) / u.numel())
        assert abs(agree - expected) < 6 * se, f"{name}: agreement {agree:.4f}, expected {expected}"


def test_torch_mask_is_torch_rand_and_repeatable():
    """torch_keep_mask(seed) = torch.rand(M, K) ≥ p from a generator seeded with seed (int or 0-d tensor), and
    leaves torch's default generator alone; seed None draws from the default generator (torch.manual_seed
    repeats it, as nn.Dropout). Float dtypes give the same mask as 1/0; per-row p compares each row with its p."""
    M, K, p = 9, 21, 0.3
    u = torch.rand(M, K, generator=torch.Generator().manual_seed(5))
    state = torch.get_rng_state()
    assert torch.equal(torch_keep_mask(5, M, K, p), u >= p)
    assert torch.equal(torch_keep_mask(torch.tensor(5), M, K, p), u >= p)
    assert torch.equal(torch.get_rng_state(), state), "a seeded mask must not use the default generator"
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        got = torch_keep_mask(5, M, K, p, dtype=dt)
        assert got.dtype == dt and torch.equal(got, (u >= p).to(dt))
    rows = torch.linspace(0.05, 0.95, M)
    assert torch.equal(torch_keep_mask(5, M, K, rows), u >= rows[:, None])
    torch.manual_seed(3)
    a = torch_keep_mask(None, M, K, p)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(M, K) >= p)
    assert not torch.equal(torch_keep_mask(None, M, K, p), a)      # the stream moved on


@pytest.mark.parametrize("K", [1, 7, 8, 13, 64, 67])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_packed_mask_round_trip(K, p):
    """draw_packed: keep is torch_keep_mask's for the seed (in the dtype asked for), its bits have bit j of byte c
    = keep[:, 8c + j] (checked against a plain loop; all-ones and all-zero bytes included), and unpack_mask gives
    the mask back in bool and every float dtype."""
    M = 11
    keep, bits = draw_packed(K, M, K, p, torch.float32)
    want = torch_keep_mask(K, M, K, p)
    assert keep.dtype == torch.float32 and torch.equal(keep, want.float())
    assert bits.dtype == torch.uint8 and bits.shape == (M, (K + 7) // 8)
    ref = torch.zeros(M, (K + 7) // 8, dtype=torch.int64)
    for c in range(K):
        ref[:, c // 8] += want[:, c].long() << (c % 8)
    assert torch.equal(bits.long(), ref)
    for dt in (torch.bool, torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert torch.equal(unpack_mask(bits, K, dt), want.to(dt)), dt
    assert torch.equal(draw_packed(K, M, K, p, torch.bfloat16)[0], want.bfloat16())
    full, empty = (torch.full((3, 2), b, dtype=torch.uint8) for b in (255, 0))
    assert unpack_mask(full, 16).all() and not unpack_mask(empty, 16).any()
    keep0, bits0 = draw_packed(None, 0, K, p, torch.float32)
    assert keep0.shape == (0, K) and bits0.shape == (0, (K + 7) // 8)


# ---------------------------------------------------------------------------
# the fused op uses exactly this mask, forward and backward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_op_drops_exactly_its_backends_mask(backend):
    """W0 = 0, A = B = I, s = 1: y = dropout(x) and dx = dropout(dy); their zero patterns are the mask: the
    kernels' Philox mask on "triton", torch_keep_mask's on "torch", for the same seed.

    x is (B, T, K).transpose(0, 1): row m of the (M, K) view is the m-th row in x's logical order,
    not in its storage order. Values equal x·keep/(1 − p) within fp32 rounding (the kernels
    multiply by the fp32 reciprocal instead of dividing).
    """
    Bt, T, K, p, seed = 4, 10, 24, 0.3, 42
    x = (torch.rand(Bt, T, K) + 0.5).transpose(0, 1).requires_grad_()      # no zeros in x
    eye = torch.eye(K)
    A, B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    y = lora_linear(x, torch.zeros(K, K), None, A, B, 1.0, p, seed=seed, backend=backend)
    keep = mask_of(backend, seed, T * Bt, K, p).reshape(T, Bt, K)
    assert torch.equal(y != 0, keep), f"{(~((y != 0) == keep)).sum()} elements dropped differently"
    torch.testing.assert_close(y, (x * keep / (1 - p)).detach(), rtol=2e-7, atol=0)
    dy = torch.rand(T, Bt, K) + 0.5
    y.backward(dy)
    assert torch.equal(x.grad != 0, keep), "backward regenerated a different mask"
    torch.testing.assert_close(x.grad, dy * keep / (1 - p), rtol=2e-7, atol=0)


@pytest.mark.parametrize("op", ["single", "multi"])
def test_kernels_keep_the_element_whose_uniform_equals_p(op):
    """keep iff u ≥ p, also at the exact tie: p is set to a drawn uniform u(seed, m, k) (a float32, so the
    kernels' fp32 p is exactly u); the Triton kernels keep (m, k), drop every element with u < p, keep every
    other, forward and backward; with p one float32 step above u they drop (m, k). Single-adapter op (the
    shrink and dx kernels) and multi-adapter op (its shrink and expand kernels, p from the per-adapter table)."""
    M, K, seed = 9, 12, 77
    K4 = -(-K // 4)
    u = philox_uniform4(seed, torch.arange(M * K4, dtype=torch.int64)).reshape(M, 4 * K4)[:, :K]
    m, k = divmod(int((u - 0.5).abs().argmin()), K)
    for p, kept in ((float(u[m, k]), True), (float(torch.nextafter(u[m, k], torch.tensor(1.0))), False)):
        assert torch.tensor(p, dtype=torch.float32) == u[m, k] or not kept
        keep = keep_mask(seed, M, K, p)
        assert bool(keep[m, k]) is kept and torch.equal(keep, u >= p) and (u < p).any() and (u > p).any()
        x = (torch.rand(M, K) + 0.5).requires_grad_()                          # no zeros in x
        eye = torch.eye(K)
        if op == "single":
            y = lora_linear(x, torch.zeros(K, K), None, eye, eye, 1.0, p, seed=seed, backend="triton")
        else:
            bank = AdapterBank(K, K, requires_grad=False)
            bank.add("a", eye, eye, alpha=K)                                    # scaling alpha / r = 1
            y = multi_lora_linear(x, torch.zeros(K, K), None, bank, torch.zeros(M, dtype=torch.int32), p,
                                  seed=seed, backend="triton")
        assert torch.equal(y != 0, keep), f"p = u[{m}, {k}] = {p}: {(~((y != 0) == keep)).sum()} elements differ"
        y.backward(torch.rand(M, K) + 0.5)
        assert torch.equal(x.grad != 0, keep), "backward drops differently"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_seed_drawn_without_dropout(backend):
    """p = 0 (or training=False) draws nothing: torch's generator is untouched. p > 0 draws (a seed for the
    kernels; the mask itself on the CPU torch path)."""
    x, W, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    state = torch.get_rng_state()
    lora_linear(x, W, None, A, B, 1.0, 0.0, backend=backend)
    lora_linear(x, W, None, A, B, 1.0, 0.5, training=False, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    lora_linear(x, W, None, A, B, 1.0, 0.5, backend=backend)
    assert not torch.equal(torch.get_rng_state(), state)


def test_torch_backend_draws_the_mask_once_and_keeps_it_bit_packed(monkeypatch):
    """Eager training on the torch backend: the mask is drawn in forward only (reused in backward from a
    bit-packed copy, 1 bit per element of x), and the gradients are those of that mask."""
    from fastlora.ops import lora as ops
    reference = ops                              # the torch backend lives beside the op
    drawn = []
    real = ops.draw_packed
    monkeypatch.setattr(ops, "draw_packed", lambda *a, **k: drawn.append(1) or real(*a, **k))
    monkeypatch.setattr(reference, "draw_keep", lambda *a, **k: (_ for _ in ()).throw(AssertionError("redrawn")))
    M, K, N, p = 30, 21, 12, 0.3
    x = torch.randn(M, K, requires_grad=True)
    W, A, B = torch.randn(N, K), torch.randn(4, K, requires_grad=True), torch.randn(N, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, W, None, A, B, 0.5, p, seed=9, backend="torch")
    y.backward(torch.ones_like(y))
    assert drawn == [1]
    bits = [t for t in saved if t.dtype == torch.uint8]
    assert len(bits) == 1 and bits[0].shape == (M, (K + 7) // 8)
    keep = torch_keep_mask(9, M, K, p)
    assert torch.equal(unpack_mask(bits[0], K), keep)
    torch.testing.assert_close(x.grad, W.sum(0).expand(M, K) + ((B.sum(0) @ A) * 0.5 * keep / (1 - p)).detach(),
                               rtol=1e-5, atol=1e-5)


def test_torch_backend_default_mask_is_nn_dropouts_draw():
    """No seed on the CPU torch path: the mask is u = torch.rand(M, K) ≥ p from torch's default generator at
    that point of its stream (one draw per element, like nn.Dropout's one bernoulli_), so torch.manual_seed
    repeats a run; no seed tensor is drawn first."""
    M, K, p = 6, 10, 0.4
    x = torch.rand(M, K) + 0.5                                    # no zeros in x
    torch.manual_seed(21)
    y = lora_linear(x, torch.zeros(K, K), None, torch.eye(K), torch.eye(K), 1.0, p, backend="torch")
    torch.manual_seed(21)
    keep = torch.rand(M, K) >= p
    torch.testing.assert_close(y, x * keep / (1 - p), rtol=2e-7, atol=0)
