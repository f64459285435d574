"""torch.compile(fullgraph=True) of a module calling fastlora.lora_linear, on CPU.

fullgraph=True turns any graph break into an error, so a passing test proves the op (its two
torch.library custom ops, fake kernels and autograd registration) traces as one graph. Compiled
results must equal eager ones (same kernels underneath, so up to the compiler's reassociation of
the surrounding loss: tight tolerances). Backends: "torch" (pure torch) and "triton" (the kernels,
interpreted under TRITON_INTERPRET=1, called by Inductor as an opaque custom op).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from fastlora import lora_linear

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
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-5, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
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
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_tensor_scaling(backend):
    """A 0-d tensor scaling is a graph input: changing its value neither recompiles nor goes stale."""
    model = Tiny(backend, p=0.1, tensor_scaling=True)
    compiled, x = _train_and_eval(model)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        model.scaling.fill_(0.5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_default_seed():
    """seed=None draws the seed inside the graph (torch.randint on x's device): still one graph."""
    model = Tiny("torch", p=0.5)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, K, requires_grad=True)
    y, grads = _step(compiled, model, x, None)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    y2, _ = _step(compiled, model, x, None)
    assert not torch.equal(y, y2), "two steps should draw two different masks"
