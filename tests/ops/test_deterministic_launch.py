"""deterministic=True must reach the kernels: every Triton launch that could reduce with atomics is
launched with ATOMIC=False.

Bitwise-repeat tests (tests/ops/test_linear_grad.py) cannot show this on a CPU: the interpreter runs atomic
adds in a fixed order, so they are repeatable there even when deterministic mode never reaches the
kernels. These tests spy on the launches instead (tests/_launches.py: every Triton kernel class's ``run``),
so they hold whatever the kernels and launchers are called. A launch is recorded with its kernel's name,
its meta-parameters and whether the kernel's source uses atomics.
"""
from __future__ import annotations

import pytest
import torch

import fastlora

from fastlora.ops.bank import AdapterBank
from fastlora.ops.multi import multi_lora_linear
from tests._launches import launches  # noqa: F401  (the fixture)
from tests._tolerance import assert_baseline_sane, assert_close
from tests.ops.test_grid import QLora, _oracle
from tests.ops.test_linear_parity import SEED, Case, check_parity, make_problem, run_fastlora


def _backward(deterministic, p, fan_in_fan_out=False):
    """fastlora.lora_linear forward + backward on the interpreted kernels; returns its gradients."""
    pb = make_problem(Case(dtype="fp32", M=37, KN=(20, 36), r=5, layout="contig", p=p,
                           fan_in_fan_out=fan_in_fan_out))
    return pb, run_fastlora(pb, "triton", deterministic=deterministic)


def _assert_atomic_free(runs, what):
    assert runs, f"{what}: no Triton launch was recorded (is the spy still in the launch path?)"
    bad = [(r.kernel, r.meta.get("ATOMIC", "no ATOMIC switch")) for r in runs
           if r.meta.get("ATOMIC", False) is not False or (r.uses_atomics and "ATOMIC" not in r.meta)]
    assert not bad, f"{what}: launches that may reduce with atomics: {bad}"


@pytest.mark.parametrize("p,fan_in_fan_out", [(0.1, False), (0.0, True)])
def test_deterministic_reaches_every_atomic_launch(launches, p, fan_in_fan_out):
    """By default the backward reduces dA / dB / dbias with atomics (ATOMIC=True reaches a kernel);
    deterministic=True (the argument, or torch.use_deterministic_algorithms) launches none with atomics."""
    _backward(False, p, fan_in_fan_out)
    default = list(launches)
    assert any(r.meta.get("ATOMIC") is True for r in default), (
        f"no launch got ATOMIC=True by default: {[(r.kernel, r.meta.get('ATOMIC')) for r in default]}; "
        f"this test can only prove something about a switch it sees")
    assert any(r.uses_atomics for r in default)

    launches.clear()
    pb, got = _backward(True, p, fan_in_fan_out)
    _assert_atomic_free(launches, "deterministic=True")
    check_parity(pb, got, "triton")                      # and the atomic-free reduction is right

    launches.clear()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _backward(None, p, fan_in_fan_out)     # deterministic=None follows torch's flag
    finally:
        torch.use_deterministic_algorithms(prev)
    _assert_atomic_free(launches, "torch.use_deterministic_algorithms(True)")


def test_torch_backend_launches_no_kernel(launches):
    """The torch backend (pure torch matmuls, no atomics anywhere) launches no Triton kernel at all, in
    either mode, and repeats bitwise."""
    pb = make_problem(Case(dtype="fp32", M=37, KN=(20, 36), r=5, layout="contig", p=0.1))
    a, b = run_fastlora(pb, "torch", deterministic=True), run_fastlora(pb, "torch", deterministic=True)
    run_fastlora(pb, "torch", deterministic=False)
    assert launches == []
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("regime", ["decode", "grouped"])
def test_multi_adapter_kernels_never_use_atomics(launches, regime):
    """The multi-adapter op has no deterministic switch because its kernels write disjoint blocks: every
    launch of its forward and backward is atomic-free (a kernel that starts using atomics needs a switch)."""
    K, N = 20, 28
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(K, N, requires_grad=True)
    for i, r in enumerate((2, 5, 8)):
        bank.add(f"a{i}", torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), alpha=r)
    x = torch.randn(19, K, generator=g, requires_grad=True)
    ids = torch.randint(-1, 3, (19,), generator=g, dtype=torch.int32)
    y = multi_lora_linear(x, torch.randn(N, K, generator=g), None, bank, ids, 0.1, seed=SEED, regime=regime,
                          backend="triton")
    y.backward(torch.randn(y.shape, generator=g))
    _assert_atomic_free(launches, f"multi-adapter ({regime})")
    kernels = {r.kernel for r in launches}
    assert len(kernels) >= 3, kernels          # shrink, expand and the segment-gradient kernel all ran


@pytest.mark.parametrize("deterministic", [False, True])
def test_compiled_training_step_keeps_deterministic(launches, deterministic):
    """torch.compile traces the registered op (fastlora::lora_linear_fwd / _bwd): deterministic=True must reach
    the compiled graph's backward launches too, and the default must still reach the atomic ones."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 37, 20, 36, 5
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g, requires_grad=True)
    A = torch.randn(r, K, generator=g, requires_grad=True)
    B = torch.randn(N, r, generator=g, requires_grad=True)

    def step(x, A, B, bias):
        return fastlora.lora_linear(x, W, bias, A, B, 0.5, 0.1, True, seed=3, backend="triton",
                                    deterministic=deterministic)
    torch._dynamo.reset()
    y = torch.compile(step, backend="eager", fullgraph=True)(x, A, B, bias)
    launches.clear()                                              # the backward's launches only
    y.backward(torch.randn(y.shape, generator=g))
    if deterministic:
        _assert_atomic_free(launches, "torch.compile with deterministic=True")
    else:
        assert any(r.meta.get("ATOMIC") is True for r in launches), [(r.kernel, r.meta.get("ATOMIC")) for r in launches]
    # and the compiled step is right: every gradient vs the float64 oracle (the kernels' mask for the seed),
    # with the fp32 plain-torch reference as the baseline of the error bound
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, bias, A, B)]
        out = fastlora.lora_linear_reference(leaves[0], W.to(dtype), leaves[1], leaves[2], leaves[3], 0.5, 0.1, seed=3)
        out.backward(dy.to(dtype))
        if dtype == torch.float64:
            oracle = [out.detach()] + [t.grad for t in leaves]
        else:
            base = [out.detach()] + [t.grad for t in leaves]
    for t in (x, A, B, bias):
        t.grad = None
    y = torch.compile(step, backend="eager", fullgraph=True)(x, A, B, bias)
    y.backward(dy)
    for name, got, ref, bl in zip(("y", "dx", "dbias", "dA", "dB"), [y.detach(), x.grad, bias.grad, A.grad, B.grad],
                                  oracle, base):
        assert_close(name, got, ref, bl)


@pytest.mark.parametrize("entry", ["eager", "compile"])
def test_qlora_keeps_deterministic(launches, entry):
    """QLoRA is the LoRA op on a dequantizing weight: deterministic=True reaches its backward launches in eager
    training and under torch.compile (which traces the registered op on the dequantized weight); by default
    they reduce with atomics. Both runs: the output and every gradient vs the float64 oracle (tests/ops/test_grid.py's
    4-bit case)."""
    case = QLora()
    dy = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    oracle, base = _oracle(case, torch.float64, dy), _oracle(case, torch.float32, dy)
    for name, bl, ref in zip(("y", "dx", "dA", "dB"), base, oracle):
        assert_baseline_sane(f"QLoRA float32 baseline {name}", bl, ref)
    for deterministic in (False, True):
        def step(x, A, B):
            return fastlora.qlora_linear(x, case.base, A, B, 2.0, backend="triton", deterministic=deterministic)
        if entry == "compile":
            torch._dynamo.reset()
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        leaves = case.leaves()
        y = step(*leaves)
        launches.clear()                                           # the backward's launches only
        y.backward(dy)
        if deterministic:
            _assert_atomic_free(launches, f"QLoRA {entry} with deterministic=True")
        else:
            assert any(r.meta.get("ATOMIC") is True for r in launches), [(r.kernel, r.meta.get("ATOMIC"))
                                                                       for r in launches]
        for name, got, ref, bl in zip(("y", "dx", "dA", "dB"), [y.detach()] + [t.grad for t in leaves], oracle, base):
            assert_close(f"QLoRA {entry} deterministic={deterministic} {name}", got, ref, bl)
