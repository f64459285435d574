"""The compiled kernels on a CUDA device: the CPU suite's parity checks, re-run on the GPU.

    TRITON_INTERPRET=0 python -m pytest -q -n 8 tests/kernels/test_gpu.py        # on a machine with a GPU

Skipped without CUDA and under the interpreter (the CPU suite runs the same kernels interpreted).
Same idiom as everywhere (tests/_tolerance.py): every output and gradient vs a float64 oracle (computed
on the GPU in float64 from the same inputs and the same Philox mask) and vs PEFT (single adapter) or
PEFT's arithmetic (multi-adapter) in the same dtypes on the same GPU. What only a GPU shows:
the policy's tile configs with masked tails at real sizes, cuBLAS accumulating in place, tensor-core
precision (tf32 / tf32x3 for fp32 adapters on a half base), atomics vs the deterministic mode, and
torch.compile with the Triton ops inside an inductor graph.
"""
from __future__ import annotations

import pytest
import torch

from fastlora.core.backend import interpreting
from tests.ops import test_linear_parity as lp
from tests.ops import test_multi_parity as mp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(),
    reason="needs CUDA with TRITON_INTERPRET unset or 0 (compiled kernels)")]
DEV = "cuda"


def to_dev(t: torch.Tensor | None) -> torch.Tensor | None:
    """t on the GPU with the same sizes, strides and storage offset (a column slice stays a slice)."""
    if t is None:
        return None
    buf = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=DEV)
    out = buf.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def gpu_problem(case: lp.Case) -> lp.Problem:
    pb = lp.make_problem(case)
    g = lp.Problem(to_dev(pb.x), to_dev(pb.weight), to_dev(pb.bias), to_dev(pb.A), to_dev(pb.B), pb.scaling,
                   to_dev(pb.dy), case)
    assert g.x.stride() == pb.x.stride() and g.x.is_contiguous() == pb.x.is_contiguous()
    return g


# ----------------------------------------------------------------------------- single adapter
# The CPU suite's pairwise design and one-axis sweeps, and sizes big enough for several K-loop iterations of
# the shrink kernel, tails in every tile dimension, and cuBLAS accumulating onto the Triton-written buffers.
LARGE = [lp.Case(dtype=d, r=16, M=1000, KN=(1000, 1096), layout="3d", bias=True, p=0.1) for d in lp.DTYPES] + [
    lp.Case(dtype="bf16", r=64, M=777, KN=(520, 1000), layout="slice", p=0.1),
    lp.Case(dtype="fp16", r=3, M=1025, KN=(1000, 520), layout="3d_t", fan_in_fan_out=True, p=0.0),
    lp.Case(dtype="bf16+fp32", r=128, M=300, KN=(4096, 4096), layout="contig", p=0.1),
]
CASES = lp.PAIRWISE + lp.SWEEPS + LARGE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_linear_parity_gpu(case):
    pb = gpu_problem(case)
    lp.check_parity(pb, lp.run_fastlora(pb, "triton"), "triton")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16+fp32"])
def test_deterministic_gpu(dtype):
    """deterministic=True: no atomics, bitwise-identical gradients on repeat, and still correct."""
    pb = gpu_problem(lp.Case(dtype=dtype, r=16, M=1000, KN=(1000, 1096), layout="3d", p=0.1))
    first = lp.run_fastlora(pb, "triton", deterministic=True)
    again = lp.run_fastlora(pb, "triton", deterministic=True)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    lp.check_parity(pb, first, "triton")


def test_torch_compile_gpu():
    """torch.compile(fullgraph=True) over the custom op on CUDA: same y and gradients as eager."""
    import fastlora
    pb = gpu_problem(lp.Case(dtype="bf16", r=16, M=256, KN=(512, 384), layout="contig", p=0.1))

    def f(x, w, b, A, B):
        # x * 2 and relu are exact in bf16 (forward and backward), so compiled == eager bitwise
        return torch.relu(fastlora.lora_linear(x * 2, w, b, A, B, 2.0, 0.1, True, seed=7))

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        x, b, A, B = (lp._leaf(t) for t in (pb.x, pb.bias, pb.A, pb.B))
        y = fn(x, pb.weight, b, A, B)
        y.backward(pb.dy)
        outs.append([y.detach(), x.grad, b.grad, A.grad, B.grad])
    for name, e, c in zip(("y", "dx", "dbias", "dA", "dB"), *outs):
        torch.testing.assert_close(c, e, rtol=0, atol=0, msg=name)   # same kernels, same inputs: bitwise


SIZES = (777, 1000, 1096, 16, 2.0, 0.1)     # M, K, N, r, scaling, p


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_mixed_dtype_qlora_recipe_gpu(half):
    """The QLoRA recipe's op (fastlora.ops.qlora: float32 x and adapters, a half base weight): the Triton shrink /
    expand on float32 x, the base GEMM + bias in the half dtype added by torch; y, dx, dA, dB, dbias vs the float64
    oracle and PEFT's arithmetic (base in the half dtype on x cast to it, adapter branch in float32)."""
    from fastlora.ops import lora as ops
    from fastlora.core.dropout import keep_mask
    from tests._tolerance import assert_close
    torch.manual_seed(0)
    M, K, N, r, s, p = SIZES
    x, dy = torch.randn(M, K, device=DEV), torch.randn(M, N, device=DEV)
    W, b = (torch.randn(N, K, device=DEV) / K ** 0.5).to(half), (torch.randn(N, device=DEV) * 0.1).to(half)
    A, B = torch.randn(r, K, device=DEV) / K ** 0.5, torch.randn(N, r, device=DEV) / r ** 0.5
    seed = torch.tensor(5, device=DEV)
    keep = keep_mask(seed, M, K, p, DEV).to(torch.float32)

    def run(fn, *ts):
        leaves = [t.detach().clone().requires_grad_(True) for t in ts]
        y = fn(*leaves)
        y.backward(dy.to(y.dtype))
        return [y.detach()] + [t.grad for t in leaves]
    scale = torch.tensor(s, device=DEV)
    got = run(lambda x, b, A, B: ops.LoraFunction.apply(x, W, b, A, B, scale, p, seed, False, False, "triton"),
              x, b, A, B)
    peft = run(lambda x, b, A, B: torch.nn.functional.linear(x.to(half), W, b).float()
               + s * ((x * keep / (1 - p)) @ A.t()) @ B.t(), x, b, A, B)
    o64 = run(lambda x, b, A, B: x @ W.double().t() + b + s * ((x * keep.double() / (1 - p)) @ A.t()) @ B.t(),
              x.double(), b.double(), A.double(), B.double())
    for name, a, o, r_ in zip(("y", "dx", "dbias", "dA", "dB"), got, o64, peft):
        assert a.dtype == r_.dtype, name
        assert_close(name, a, o, r_)


# ----------------------------------------------------------------------------- multi-adapter

MULTI_FWD = [c for c in mp.FWD_CASES if c[-1] == "triton"]


@pytest.mark.parametrize("case", MULTI_FWD, ids=[c[0] for c in MULTI_FWD])
@pytest.mark.parametrize("KN", [(45, 70), (1000, 1096)], ids=lambda kn: f"K{kn[0]}N{kn[1]}")
def test_multi_forward_gpu(case, KN):
    mp.check_forward(case, *KN, device=DEV)


@pytest.mark.parametrize("case", mp.GRAD_CASES, ids=[c[0] for c in mp.GRAD_CASES])
@pytest.mark.parametrize("KN", [(38, 52), (1000, 1096)], ids=lambda kn: f"K{kn[0]}N{kn[1]}")
def test_multi_grad_gpu(case, KN):
    mp.check_grads(case, None, *KN, device=DEV)
