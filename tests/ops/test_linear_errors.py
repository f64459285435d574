"""Bad input to fastlora.lora_linear, and backend dispatch.

Every bad argument raises ValueError (wrong value/shape) or TypeError (wrong type/dtype) whose
message names the argument; a failed call changes nothing (inputs, their .grad, torch's RNG).
Dispatch: fastlora.core.backend.select_backend is the one place that picks "triton" or "torch";
an impossible choice is an error, never a silent fallback.
"""
from __future__ import annotations

import pytest
import torch

from fastlora.kernels import linear_fwd
import fastlora.ops.lora
from fastlora import lora_linear
from fastlora.core.backend import select_backend

M, K, N, R = 4, 8, 6, 2


def good():
    """Valid arguments: x (M, K), weight (N, K), bias (N,), lora_A (R, K), lora_B (N, R), scaling."""
    return dict(x=torch.randn(M, K, requires_grad=True), weight=torch.randn(N, K),
                bias=torch.randn(N, requires_grad=True), lora_A=torch.randn(R, K, requires_grad=True),
                lora_B=torch.randn(N, R, requires_grad=True), scaling=0.5)


nan = float("nan")
meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
# (id, overrides of good(), extra kwargs, exception, regex the message must match)
BAD = [
    ("x-not-tensor", dict(x=[[1.0] * K] * M), {}, TypeError, r"^x must be a torch\.Tensor"),
    ("x-0d", dict(x=torch.tensor(1.0)), {}, ValueError, r"^x must have at least 1 dimension"),
    # float64 x is supported (gradcheck, oracles: see test_linear_grad.py), so unsupported = the rest
    ("x-int", dict(x=torch.ones(M, K, dtype=torch.int32)), {}, TypeError, r"^x must be float32, float16, bfloat16"),
    ("x-complex", dict(x=torch.randn(M, K, dtype=torch.complex64)), {}, TypeError, r"^x must be float32, float16"),
    ("x-float8", dict(x=torch.randn(M, K).to(torch.float8_e4m3fn)), {}, TypeError, r"^x must be float32, float16"),
    ("weight-K", dict(weight=torch.randn(N, K + 1)), {}, ValueError, rf"^weight must have shape \(out_features, in_features\).*= {K}"),
    ("weight-not-fifo-layout", dict(weight=torch.randn(N, K)), dict(fan_in_fan_out=True), ValueError,
     r"^weight must have shape \(in_features, out_features\) with fan_in_fan_out=True"),
    ("weight-3d", dict(weight=torch.randn(1, N, K)), {}, ValueError, r"^weight must be 2-D"),
    ("weight-dtype", dict(weight=torch.randn(N, K, dtype=torch.float16)), {}, TypeError,
     r"^weight must have x's dtype torch\.float32, got torch\.float16: cast x to torch\.float16 .* torch\.autocast"),
    ("lora_A-K", dict(lora_A=torch.randn(R, K + 3)), {}, ValueError, rf"^lora_A must have shape \(r, {K}\)"),
    ("lora_A-1d", dict(lora_A=torch.randn(K)), {}, ValueError, r"^lora_A must be \(r, 8\)"),
    ("lora_B-N", dict(lora_B=torch.randn(N + 1, R)), {}, ValueError, rf"^lora_B must have shape \({N}, {R}\)"),
    ("lora_B-r", dict(lora_B=torch.randn(N, R + 1)), {}, ValueError, rf"^lora_B must have shape \({N}, {R}\)"),
    ("r-0", dict(lora_A=torch.randn(0, K), lora_B=torch.randn(N, 0)), {}, ValueError, r"^lora_A must be .* r >= 1"),
    ("adapter-dtype", dict(x=torch.randn(M, K, dtype=torch.float16), weight=torch.randn(N, K, dtype=torch.float16),
                           lora_A=torch.randn(R, K, dtype=torch.bfloat16), lora_B=torch.randn(N, R, dtype=torch.bfloat16),
                           bias=None), {}, TypeError, r"^lora_A and lora_B must share one dtype"),
    ("adapters-mixed", dict(lora_B=torch.randn(N, R, dtype=torch.float16)), {}, TypeError, r"^lora_A and lora_B must share"),
    ("bias-shape", dict(bias=torch.randn(N + 1)), {}, ValueError, rf"^bias must have shape \({N},\)"),
    ("bias-type", dict(bias=[0.0] * N), {}, TypeError, r"^bias must be a torch\.Tensor or None"),
    ("bias-dtype", dict(bias=torch.zeros(N, dtype=torch.int64)), {}, TypeError, r"^bias must have x's dtype"),
    ("device-weight", dict(weight=meta(N, K)), {}, ValueError, r"must be on one device.*meta"),
    ("device-lora_B", dict(lora_B=meta(N, R)), {}, ValueError, r"must be on one device.*meta"),
    ("device-bias", dict(bias=meta(N)), {}, ValueError, r"must be on one device.*meta"),
    ("scaling-nan", dict(scaling=nan), {}, ValueError, r"^scaling must be finite"),
    ("scaling-inf", dict(scaling=float("inf")), {}, ValueError, r"^scaling must be finite"),
    ("scaling--inf", dict(scaling=-float("inf")), {}, ValueError, r"^scaling must be finite"),
    ("scaling-tensor-nan", dict(scaling=torch.tensor(nan)), {}, ValueError, r"^scaling must be finite"),
    ("scaling-tensor-inf", dict(scaling=torch.tensor(float("inf"))), {}, ValueError, r"^scaling must be finite"),
    ("scaling-shape", dict(scaling=torch.ones(2)), {}, ValueError, r"^scaling must be a float or a one-element tensor \(0-d or shape \(1,\)\)"),
    ("scaling-str", dict(scaling="0.5"), {}, TypeError, r"^scaling must be a float or a one-element tensor \(0-d or shape \(1,\)\)"),
    ("scaling-bool", dict(scaling=True), {}, TypeError, r"^scaling must be a float or a one-element tensor \(0-d or shape \(1,\)\)"),
    ("dropout-negative", {}, dict(dropout_p=-0.1), ValueError, r"^dropout_p must be a float in \[0, 1\)"),
    ("dropout-one", {}, dict(dropout_p=1.0), ValueError, r"^dropout_p must be a float in \[0, 1\)"),
    ("dropout-big", {}, dict(dropout_p=1.5), ValueError, r"^dropout_p must be a float in \[0, 1\)"),
    ("dropout-nan", {}, dict(dropout_p=nan), ValueError, r"^dropout_p must be a float in \[0, 1\)"),
    ("dropout-str", {}, dict(dropout_p="0.1"), ValueError, r"^dropout_p must be a float in \[0, 1\)"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("overrides,kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(overrides, kwargs, exc, match, backend):
    args = {**good(), **overrides}
    before = {k: v.detach().clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    # (a float8 x cannot be compared by torch.equal: compare its bytes)
    before = {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v for k, v in before.items()}
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        lora_linear(**args, dropout_p=0.1, backend=backend, **kwargs) if "dropout_p" not in kwargs \
            else lora_linear(**args, backend=backend, **kwargs)
    # a failed call leaves everything as it was
    for k, v in before.items():
        now = args[k].detach().view(torch.uint8) if args[k].dtype == torch.float8_e4m3fn else args[k]
        torch.testing.assert_close(now, v, rtol=0, atol=0, equal_nan=True, msg=f"{k} was modified by a failed call")
        assert args[k].grad is None, f"{k} got a .grad from a failed call"
    assert torch.equal(torch.get_rng_state(), rng), "a failed call drew from torch's generator"


def test_good_arguments_pass():
    """The baseline of BAD is valid (so every failure above is due to its one override)."""
    for backend in ("triton", "torch"):
        y = lora_linear(**good(), dropout_p=0.1, backend=backend)
        assert y.shape == (M, N)


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    return monkeypatch


@pytest.mark.parametrize("interp,device,expected", [
    ("1", CPU, "triton"), ("0", CPU, "torch"), ("", CPU, "torch"), (None, CPU, "torch"),
    ("0", CUDA, "triton"), ("1", CUDA, "triton")])
def test_select_backend_auto(env, interp, device, expected):
    if interp is None:
        env.delenv("TRITON_INTERPRET", raising=False)
    else:
        env.setenv("TRITON_INTERPRET", interp)
    assert select_backend(device) == expected
    assert select_backend(device, "auto") == expected


def test_select_backend_override_and_env(env):
    env.setenv("TRITON_INTERPRET", "1")
    assert select_backend(CPU, "torch") == "torch"
    assert select_backend(CPU, "triton") == "triton"
    env.setenv("FASTLORA_BACKEND", "torch")
    assert select_backend(CPU) == "torch"                 # env var forces torch over the interpreter
    assert select_backend(CPU, "triton") == "triton"      # the argument wins over the env var
    env.setenv("FASTLORA_BACKEND", "triton")
    assert select_backend(CPU) == "triton"
    assert select_backend(CUDA, "torch") == "torch"


def test_select_backend_impossible_or_unknown(env):
    env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        select_backend(CPU, "triton")
    env.setenv("FASTLORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        select_backend(CPU)
    for bad in ("cuda", "Torch", ""):
        with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'torch'\)"):
            select_backend(CPU, bad)
    env.setenv("FASTLORA_BACKEND", "gpu")                 # the message names the env var, not the argument
    with pytest.raises(ValueError, match=r"^FASTLORA_BACKEND must be one of \('auto', 'triton', 'torch'\), got 'gpu'"):
        select_backend(CPU)


@pytest.fixture
def spies(monkeypatch):
    """Count calls of the Triton forward launcher and of the pure-torch forward (both still run)."""
    calls = {"triton": 0, "torch": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(linear_fwd, "lora_fwd", spy("triton", linear_fwd.lora_fwd))
    monkeypatch.setattr(fastlora.ops.lora, "torch_forward", spy("torch", fastlora.ops.lora.torch_forward))
    return calls


@pytest.mark.parametrize("arg,env_value,expected", [
    (None, None, "triton"), ("torch", None, "torch"), ("triton", None, "triton"), ("auto", None, "triton"),
    (None, "torch", "torch"), (None, "triton", "triton"),
    ("triton", "torch", "triton")])
def test_lora_linear_runs_the_selected_backend(env, spies, arg, env_value, expected):
    """Under tests/conftest.py's TRITON_INTERPRET=1, auto picks the kernels on CPU tensors."""
    if env_value is not None:
        env.setenv("FASTLORA_BACKEND", env_value)
    lora_linear(**good(), backend=arg)
    assert spies == {"triton": int(expected == "triton"), "torch": int(expected == "torch")}


def test_lora_linear_impossible_backend_is_an_error(env, spies):
    env.setenv("TRITON_INTERPRET", "0")
    args = good()
    x0 = args["x"].detach().clone()
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors"):
        lora_linear(**args, backend="triton")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        lora_linear(**args, backend="gpu")
    assert spies == {"triton": 0, "torch": 0}            # no silent fallback
    assert torch.equal(args["x"], x0) and args["x"].grad is None
    y = lora_linear(**args)                               # auto without the interpreter: pure torch
    assert spies == {"triton": 0, "torch": 1} and y.shape == (M, N)
