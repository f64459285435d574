"""torch.compile(fullgraph=True) of a module calling fastlora.lora_linear, on CPU.

fullgraph=True turns any graph break into an error, so a passing test proves the op (its two
torch.library custom ops, fake kernels and autograd registration) traces as one graph. The compiled
and the eager results are each checked against a float64 run of the same maths through
fastlora.lora_linear_reference (same dropout mask), with that reference in float32 as the baseline of
the tolerance idiom (tests/_tolerance.py): comparing compiled with eager alone would pass a bug both
share. Backends: "torch" (pure torch) and "triton" (the kernels, interpreted under TRITON_INTERPRET=1,
called by Inductor as an opaque custom op).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from fastlora import lora_linear, lora_linear_reference
from tests._replay import mask_of
from tests._tolerance import assert_close

K, N, R = 24, 20, 4


class Tiny(nn.Module):
    """Frozen base (N, K) + bias + LoRA adapters; scaling a Python float or a 0-d buffer."""

    def __init__(self, backend, p, tensor_scaling=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(N, K, generator=g) / K ** 0.5)
        self.bias = nn.Parameter(torch.randn(N, generator=g))
        self.lora_A = nn.Parameter(torch.randn(R, K, generator=g) / K ** 0.5)
        self.lora_B = nn.Parameter(torch.randn(N, R, generator=g))
        if tensor_scaling:
            self.register_buffer("scaling", torch.tensor(2.0))
        else:
            self.scaling = 2.0
        self.backend, self.p = backend, p

    def forward(self, x, seed=None):
        h = lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.p,
                        training=self.training, seed=seed, backend=self.backend)
        return torch.tanh(h)


def _step(fn, model, x, seed):
    """One train step of fn (model or its compiled wrapper); returns y and model's gradients."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = fn(x, seed)
    loss = y.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if x.requires_grad:
        grads["x"] = x.grad.clone()
    return y.detach(), grads


def _reference(model, x, seed, dtype, backward=True):
    """Tiny's maths through lora_linear_reference in ``dtype`` (autograd): y and the gradients _step returns."""
    leaf = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    xx = x.detach().to(dtype).requires_grad_(x.requires_grad)
    b, A, B = leaf(model.bias), leaf(model.lora_A), leaf(model.lora_B)
    p = model.p if model.training else 0.0
    keep = mask_of(model.backend, int(seed), xx.numel() // K, K, p) if p > 0 else None   # the backend's mask
    y = torch.tanh(lora_linear_reference(xx, model.weight.to(dtype), b, A, B, float(model.scaling), p, keep=keep))
    if not backward:
        return y.detach()
    y.square().mean().backward()
    grads = {"bias": b.grad, "lora_A": A.grad, "lora_B": B.grad}
    if x.requires_grad:
        grads["x"] = xx.grad
    return y.detach(), grads


def _check_eval(compiled, model, x):
    """Eval mode (no dropout, no grad): compiled and eager outputs each vs the float64 reference."""
    with torch.no_grad():
        ref, base = _reference(model, x, None, torch.float64, False), _reference(model, x, None, torch.float32, False)
        assert_close("compiled eval y", compiled(x), ref, base)
        assert_close("eager eval y", model(x), ref, base)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_and_eval(model):
    """Compiled vs eager: one train step (forward + backward, same mask seed), then eval."""
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, K, requires_grad=True)     # as for a layer behind trainable ones
    seed = torch.tensor(11)
    y_c, g_c = _step(compiled, model, x, seed)
    y_e, g_e = _step(model, model, x, seed)
    (y_r, g_r), (y_b, g_b) = _reference(model, x, seed, torch.float64), _reference(model, x, seed, torch.float32)
    assert set(g_c) == set(g_e) == set(g_r) == {"bias", "lora_A", "lora_B", "x"}
    for kind, y, g in (("compiled", y_c, g_c), ("eager", y_e, g_e)):
        assert_close(f"{kind} y", y, y_r, y_b)
        for name in g_r:
            assert_close(f"{kind} d{name}", g[name], g_r[name], g_b[name])
    model.eval()
    _check_eval(compiled, model, x)
    return compiled, x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_float_scaling(backend):
    _train_and_eval(Tiny(backend, p=0.1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_new_float_scaling(backend):
    """A changed Python-float scaling may recompile (dynamo guards it), but must trace and not go stale."""
    model = Tiny(backend, p=0.1)
    compiled, x = _train_and_eval(model)
    model.scaling = 0.5
    _check_eval(compiled, model, x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_tensor_scaling(backend):
    """A 0-d tensor scaling is a graph input: changing its value neither recompiles nor goes stale."""
    model = Tiny(backend, p=0.1, tensor_scaling=True)
    compiled, x = _train_and_eval(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.scaling.fill_(0.5)
        _check_eval(compiled, model, x)


def test_compile_fullgraph_default_seed():
    """seed=None draws the seed inside the graph (torch.randint on x's device): still one graph."""
    model = Tiny("torch", p=0.5)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, K, requires_grad=True)
    y, grads = _step(compiled, model, x, None)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    y2, _ = _step(compiled, model, x, None)
    assert not torch.equal(y, y2), "two steps should draw two different masks"
