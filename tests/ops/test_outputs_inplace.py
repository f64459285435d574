"""Every fused op returns an ordinary tensor in training (issue 19): never a view of its input, of a saved tensor
or of a tensor made inside the autograd Function, so a training step may modify it in place (model code that adds in
place, PEFT's AdaLoRA / mixed adapters on top of a fused layer). Checked for lora_linear, dora_linear and
multi_lora_linear on both backends, 1-D to 3-D x, with dropout (qlora_linear: tests/ops/test_qlora.py): y += 1 and
y *= 2 then backward give exactly the gradients of the same step written out of place (same seed, same mask)."""
import pytest
import torch

import fastlora
from fastlora.ops.bank import AdapterBank

K, N, R = 12, 10, 3


def _op(name, backend):
    torch.manual_seed(1)
    w, b = torch.randn(N, K), torch.randn(N)
    A, B = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    if name == "lora":
        return lambda x: fastlora.lora_linear(x, w, b, A, B, 0.5, 0.2, True, seed=3, backend=backend), (A, B)
    if name == "dora":
        m = torch.rand(N, requires_grad=True)
        return lambda x: fastlora.dora_linear(x, w, b, A, B, m, 0.5, 0.2, True, seed=3, backend=backend), (A, B, m)
    bank = AdapterBank(K, N)
    bank.add("a", A.detach(), B.detach(), alpha=2)
    bank.add("b", torch.randn(2, K), torch.randn(N, 2), alpha=1)
    bank.lora_A.requires_grad_(True), bank.lora_B.requires_grad_(True)

    def multi(x):                                   # per token: adapters a, b and the base model in turn
        ids = (torch.arange(x[..., 0].numel()) % 3 - 1).reshape(x.shape[:-1])
        return fastlora.multi_lora_linear(x, w, b, bank, ids, 0.2, True, seed=3, backend=backend)
    return multi, (bank.lora_A, bank.lora_B)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(K,), (5, K), (2, 3, K)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("name", ["lora", "dora", "multi"])
def test_output_is_no_view_and_may_be_modified_in_place(backend, shape, name):
    fn, leaves = _op(name, backend)
    x0 = torch.randn(*shape)
    g = None

    def step(in_place):
        nonlocal g
        for t in leaves:
            t.grad = None
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        assert y._base is None and not y._is_view(), "the op returned a view"
        if g is None:
            g = torch.randn_like(y)
        if in_place:
            y += 1.0
            y *= 2.0
        else:
            y = (y + 1.0) * 2.0
        y.backward(g)
        return [x.grad] + [t.grad.clone() for t in leaves]
    for a, b in zip(step(True), step(False)):
        assert torch.equal(a, b)
    with torch.no_grad():                              # inference (no graph): in place is always allowed
        y = fn(x0)
        y += 1.0
