"""Gradients of fastlora.lora_linear beyond the parity grid: gradcheck in float64, hypothesis
fuzzing, deterministic mode, what autograd saves, partial requires_grad, training=False, scaling.

Both backends everywhere: "triton" (the kernels, interpreted on CPU under tests/conftest.py's
TRITON_INTERPRET=1) and "torch" (the pure-torch path).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fastlora import lora_linear, lora_linear_reference
from tests._tolerance import assert_close
from tests.ops.test_linear_parity import (BACKENDS, DTYPES, LAYOUTS, SEED, Case, abs_problem, build_peft, check_parity,
                                      layout_ok, make_problem, problem_mask, run_fastlora, run_oracle,
                                      run_peft)


# ---------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,fan_in_fan_out", [(0.0, False), (0.25, False), (0.25, True)])
def test_gradcheck_float64(backend, p, fan_in_fan_out):
    """Analytic gradients (x, bias, lora_A, lora_B) = finite differences, float64, fixed mask seed.

    The interpreted kernels are slow, so for them gradcheck's fast mode (random projections of the
    Jacobian, same tolerances) replaces the full Jacobian; the torch backend gets the full check."""
    M, K, N, r = 4, 6, 5, 3
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, grad=True: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    weight = rnd(K, N, grad=False) if fan_in_fan_out else rnd(N, K, grad=False)
    f = lambda x, bias, A, B: lora_linear(x, weight, bias, A, B, 1.75, p, fan_in_fan_out=fan_in_fan_out,  # noqa: E731
                                          seed=7, backend=backend)
    inputs = (rnd(M, K), rnd(N), rnd(r, K), rnd(N, r))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "triton")


# ---------------------------------------------------------------------------
# hypothesis fuzzing: random shapes / ranks / dtypes / layouts, full parity check
# ---------------------------------------------------------------------------

@st.composite
def cases(draw):
    M = draw(st.integers(0, 40))
    layout = draw(st.sampled_from([lay for lay in LAYOUTS if layout_ok(lay, M)]))
    return Case(dtype=draw(st.sampled_from(list(DTYPES))), r=draw(st.integers(1, 20)), M=M,
                KN=(draw(st.integers(1, 48)), draw(st.integers(1, 48))), layout=layout,
                bias=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()),
                p=draw(st.sampled_from([0.0, 0.1, 0.5])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_parity(backend):
    @settings(max_examples=20, deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(), seed=st.integers(0, 2**16))
    def run(case, seed):
        pb = make_problem(case, seed)
        check_parity(pb, run_fastlora(pb, backend), backend)
    run()


# ---------------------------------------------------------------------------
# deterministic mode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16+fp32", "fp16"])
def test_deterministic_bitwise_repeatable(backend, dtype):
    """deterministic=True: gradients are bitwise identical on repeat, and correct."""
    pb = make_problem(Case(dtype=dtype, M=97, KN=(40, 36), r=16, layout="3d", p=0.1))   # several M, N tiles
    first, again = run_fastlora(pb, backend, deterministic=True), run_fastlora(pb, backend, deterministic=True)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name} differs between two deterministic runs"
    check_parity(pb, first, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_default_follows_torch_flag(backend):
    pb = make_problem(Case(M=65, KN=(40, 24), r=8))
    with _deterministic_algorithms():
        a, b = run_fastlora(pb, backend), run_fastlora(pb, backend)
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _deterministic_algorithms:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


# ---------------------------------------------------------------------------
# what autograd saves
# ---------------------------------------------------------------------------

def _saved(fn):
    """Run fn() under saved_tensors_hooks; return the list of tensors autograd saved."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_nothing_x_sized_beyond_x(backend):
    """With dropout 0.1, fastlora keeps x (alive anyway), S (M×r), weights and seeds: no mask, no
    dropped copy of x. PEFT (real nn.Dropout) keeps the mask and the dropped x on top."""
    M, K, N, r = 96, 48, 16, 8        # weight (N·K) smaller than x (M·K): "x-sized" is unambiguous
    pb = make_problem(Case(dtype="fp32", M=M, KN=(K, N), r=r, layout="contig", p=0.1))
    x = pb.x.detach().requires_grad_()
    A, B, bias = (t.detach().requires_grad_() for t in (pb.A, pb.B, pb.bias))
    y, saved = _saved(lambda: lora_linear(x, pb.weight, bias, A, B, pb.scaling, 0.1, seed=3, backend=backend))
    x_ptr = x.untyped_storage().data_ptr()
    big = [tuple(t.shape) for t in saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr() != x_ptr]
    assert big == [], f"fastlora saved x-sized tensors besides x: {big}"
    assert any(t.untyped_storage().data_ptr() == x_ptr for t in saved), "x itself should be saved"
    y.sum().backward()                # what was saved is enough for backward

    layer = build_peft(pb, backend, dropout=nn.Dropout(0.1))
    xp = pb.x.detach().requires_grad_()
    yp, peft_saved = _saved(lambda: layer(xp))
    peft_big = [t for t in peft_saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr() != x_ptr]
    assert len(peft_big) >= 2, "PEFT was expected to save the mask and the dropped x"   # what we compare with
    fl_bytes, peft_bytes = _nbytes(saved), _nbytes(peft_saved)
    assert fl_bytes < peft_bytes, f"fastlora saves {fl_bytes} B, PEFT {peft_bytes} B"


# ---------------------------------------------------------------------------
# partial requires_grad, training=False, scaling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("x",), ("A", "B"), ("bias",), ("x", "bias"), ("x", "B")])
def test_partial_requires_grad(backend, frozen):
    """Only what requires grad gets a gradient, and it is the right one."""
    pb = make_problem(Case(dtype="bf16+fp32", M=33, KN=(40, 24), r=8, layout="slice", p=0.1))
    for name in frozen:
        getattr(pb, name).requires_grad_(False)
    got = run_fastlora(pb, backend)              # asserts frozen inputs get no .grad
    expected_keys = {"y", "dx", "dA", "dB", "dbias"} - {"d" + n for n in frozen}
    assert set(got) == expected_keys
    check_parity(pb, got, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_false_ignores_dropout(backend):
    pb = make_problem(Case(dtype="fp16", M=33, KN=(40, 24), r=8, layout="t", p=0.0))
    args = (pb.weight, pb.bias, pb.A, pb.B, pb.scaling)
    y_nodrop = lora_linear(pb.x, *args, dropout_p=0.0, backend=backend)
    rng = torch.get_rng_state()
    y_eval = lora_linear(pb.x, *args, dropout_p=0.5, training=False, backend=backend)
    assert torch.equal(torch.get_rng_state(), rng), "training=False must not draw a seed"
    assert torch.equal(y_eval, y_nodrop)
    y_train = lora_linear(pb.x, *args, dropout_p=0.5, training=True, seed=1, backend=backend)
    assert not torch.equal(y_train, y_nodrop)     # the same call in training mode does drop


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_custom_op_layers(backend, monkeypatch):
    """Eager calls do not go through the custom op's dispatcher: under no_grad fastlora.ops.lora.forward directly,
    with grad ops.LoraFunction (a plain autograd.Function over the same forward / backward); the results are
    bitwise the op's. (torch.compile traces the op: tests/ops/test_linear_compile.py.)"""
    from fastlora.ops import lora as ops
    pb = make_problem(Case(dtype="bf16+fp32", M=33, KN=(40, 24), r=8, layout="3d", p=0.0))
    args = (pb.x.detach(), pb.weight, pb.bias.detach(), pb.A.detach(), pb.B.detach(), pb.scaling)
    calls = []
    real_op, real_fn = ops.lora_linear_fwd, ops.LoraFunction.apply
    monkeypatch.setattr(ops, "lora_linear_fwd", lambda *a: calls.append("op") or real_op(*a))
    monkeypatch.setattr(ops.LoraFunction, "apply", lambda *a: calls.append("fn") or real_fn(*a))
    with torch.no_grad():
        y_fast = lora_linear(*args, backend=backend)
    assert calls == []
    y_train = lora_linear(args[0].requires_grad_(), *args[1:], backend=backend)
    assert calls == ["fn"]
    scale = torch.tensor(pb.scaling, dtype=torch.float32)
    y_op, _ = real_op(*args[:5], scale, 0.0, torch.zeros((), dtype=torch.int64), False, True, False, backend)
    assert torch.equal(y_fast, y_op) and torch.equal(y_train.detach(), y_op)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_default_follows_torch_generator(backend):
    pb = make_problem(Case(dtype="fp32", M=16, KN=(24, 20), r=4, layout="contig"))
    args = (pb.x, pb.weight, pb.bias, pb.A, pb.B, pb.scaling, 0.3)
    torch.manual_seed(5)
    y1 = lora_linear(*args, backend=backend)
    torch.manual_seed(5)
    y2 = lora_linear(*args, backend=backend)
    y3 = lora_linear(*args, backend=backend)       # generator advanced: a new mask
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_float_tensor_and_no_stale_cache(backend):
    pb = make_problem(Case(dtype="fp32", M=33, KN=(40, 24), r=8, layout="contig", p=0.1))
    x, W, b, A, B = pb.x.detach(), pb.weight, pb.bias.detach(), pb.A.detach(), pb.B.detach()
    f = lambda s: lora_linear(x, W, b, A, B, s, 0.1, seed=9, backend=backend)  # noqa: E731
    # float, fp32 / fp64 0-d tensors and a 1-element 1-D tensor all mean the same runtime value
    y = f(0.3)
    for s in (torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.3])):
        assert torch.equal(f(s), y)
    # a new value takes effect (nothing cached from the first call), linearly in s
    y0, y1, y3 = f(0.0), f(1.0), f(3.0)
    assert_close("y(3) - y(0)", y3 - y0, 3 * (y1.double() - y0.double()), 3 * (y1 - y0))
    t = torch.tensor(1.0)
    assert torch.equal(f(t), y1)
    t.fill_(3.0)                                       # same tensor object, new value
    assert torch.equal(f(t), y3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_scales_adapter_grads(backend):
    """dA and dB are linear in s: s = 2 gives exactly twice the s = 1 gradients (power of two)."""
    pb = make_problem(Case(dtype="fp32", M=33, KN=(40, 24), r=8, layout="contig", p=0.1))
    g1 = run_fastlora(pb, backend)
    pb.scaling = 2 * pb.scaling
    g2 = run_fastlora(pb, backend)
    for name in ("dA", "dB"):
        torch.testing.assert_close(g2[name], 2 * g1[name], rtol=1e-6, atol=0)
    check_parity(pb, g2, backend, run_oracle(pb, backend), run_peft(pb, backend))


# ---------------------------------------------------------------------------
# the split-N path of the dS/dB pass (1 on CPU unless forced), a trainable base weight
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("split_n", [2, 3])
def test_split_n_dsdb_pass(split_n, deterministic):
    """The dS/dB pass split over N's columns (GPUs split it to fill their SMs; on CPU the split is 1, so it
    is forced here through lora_bwd's split_n=) on an N that no split divides: dx, dA, dB, dbias vs float64."""
    from fastlora.ops import lora as ops
    from fastlora.kernels.linear_bwd import lora_bwd
    pb = make_problem(Case(dtype="fp32", M=21, KN=(20, 37), r=5, layout="contig", p=0.1))
    x, A, B = pb.x.detach(), pb.A.detach(), pb.B.detach()
    scale, seed = torch.tensor(pb.scaling, dtype=torch.float32), torch.tensor(SEED)
    _, S = ops.forward(x, pb.weight, pb.bias, A, B, scale, pb.case.p, seed, False, True, "triton")
    dx, dA, dB, dbias = lora_bwd(pb.dy, x, pb.weight, A, B, S, scale, pb.case.p, seed, False,
                                 True, True, True, True, deterministic, split_n=split_n)
    got = {"dx": dx, "dA": dA, "dB": dB, "dbias": dbias}
    oracle, peft, scale_of = run_oracle(pb, "triton"), run_peft(pb, "triton"), run_oracle(abs_problem(pb), "triton")
    for name, t in got.items():
        assert_close(f"{name} (split_n={split_n})", t, oracle[name], peft[name], scale=scale_of[name])


def _all_grads(pb, f, dtype=None):
    """Gradients of every input, the weight included, of f(x, W, bias, A, B) on pb's values (cast to dtype)."""
    x, W, b, A, B = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (pb.x, pb.weight, pb.bias, pb.A, pb.B))
    f(x, W, b, A, B).backward(pb.dy.to(x.dtype))
    return {"dW": W.grad, "dx": x.grad, "dA": A.grad, "dB": B.grad, "dbias": b.grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_trainable_base_weight_gradient(backend, dtype, fan_in_fan_out):
    """weight.requires_grad=True (docs/usage.md: a trainable W0 gets its gradient): dW in W0's layout ((K, N) with
    fan_in_fan_out), K != N, and every other gradient next to it, vs float64 autograd through the reference;
    the baseline is the same autograd in the case's dtype."""
    pb = make_problem(Case(dtype=dtype, M=13, KN=(20, 12), r=4, layout="3d", p=0.1, fan_in_fan_out=fan_in_fan_out))
    p, s = pb.case.p, pb.scaling
    fused = lambda x, W, b, A, B: lora_linear(x, W, b, A, B, s, p, fan_in_fan_out=fan_in_fan_out,  # noqa: E731
                                              seed=SEED, backend=backend)
    keep = problem_mask(pb, backend)
    ref = lambda x, W, b, A, B: lora_linear_reference(x, W, b, A, B, s, p, SEED, fan_in_fan_out,  # noqa: E731
                                                      keep=keep)
    got, base, oracle = _all_grads(pb, fused), _all_grads(pb, ref), _all_grads(pb, ref, torch.float64)
    terms = _all_grads(abs_problem(pb), ref, torch.float64)      # Σ|terms| scales (tests/_tolerance.py)
    assert got["dW"].shape == pb.weight.shape and got["dW"].dtype == pb.weight.dtype
    for name in got:
        assert_close(name, got[name], oracle[name], base[name], scale=terms[name])
