"""LoraLinear / MergedLoraLinear: outputs and gradients vs a float64 oracle and vs loralib.

Tolerance idiom (flash-attention's): error of fastlora vs the float64 oracle must be at most
2x the error of plain torch in the same dtype vs that oracle, plus one unit of the dtype's
precision at the output's scale (the final rounding every implementation must make).
"""
import copy
import math

import loralib
import pytest
import torch
from torch import nn

import fastlora
from fastlora.nn.lora import LoraLinear, MergedLoraLinear, block_lora_B
from tests._replay import fastlora_mask
from tests._tolerance import assert_close


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on the pure-torch backend and on the Triton kernels (interpreted on CPU). A kernels package
    that fails to import fails these tests (it is part of fastlora, not an optional dependency)."""
    force_backend(monkeypatch, request.param)
    return request.param


def force_backend(monkeypatch, name):
    """FASTLORA_BACKEND=name for this test (fastlora.core.backend reads it at every call)."""
    monkeypatch.setenv("FASTLORA_BACKEND", name)


# Same constants as the project's idiom (tests/_tolerance.py): atol = 64 ulps (fp32) or 2 ulps
# (fp16/bf16) of the output's scale; accumulation order differs between implementations.
def check(name, got, ref64, plain):
    """The project's idiom (tests/_tolerance.py): err vs float64 <= 2 x the same-dtype baseline's + atol."""
    assert_close(name, got, ref64, plain)


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, module.lora_A.grad, module.lora_B.grad


def _loralib_pair(fan_in_fan_out, dtype=torch.float32, K=40, N=24, r=4):
    ours = LoraLinear(K, N, r, lora_alpha=8, fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    theirs = loralib.Linear(K, N, r=r, lora_alpha=8, fan_in_fan_out=fan_in_fan_out).to(dtype)
    with torch.no_grad():
        nn.init.normal_(ours.lora_B, std=0.5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_matches_loralib_and_oracle(backend, fan_in_fan_out):
    ours, theirs = _loralib_pair(fan_in_fan_out)
    x, g = torch.randn(2, 7, 40), torch.randn(2, 7, 24)
    y, dx, dA, dB = _grads(ours, x, g)
    ly, ldx, ldA, ldB = _grads(theirs, x, g)
    # float64 oracle: loralib's module in float64 (plain torch autograd, independent of fastlora)
    o64 = loralib.Linear(40, 24, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out).double()
    o64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    ry, rdx, rdA, rdB = _grads(o64, x.double(), g.double())
    for name, a, b, r in (("y", y, ly, ry), ("dx", dx, ldx, rdx), ("dA", dA, ldA, rdA), ("dB", dB, ldB, rdB)):
        check(name, a, r, b)      # loralib (plain torch fp32) is the same-dtype baseline
    # eval() merges (loralib semantics); both merged outputs agree with the oracle
    ours.eval(), theirs.eval()
    assert ours.merged and theirs.merged
    with torch.no_grad():
        check("merged y", ours(x), ry, theirs(x))


def test_linear_dropout_matches_oracle_with_same_seed(backend):
    m = LoraLinear(40, 24, 4, lora_alpha=8, lora_dropout=0.25)
    with torch.no_grad():
        nn.init.normal_(m.lora_B)
    x, g = torch.randn(9, 40), torch.randn(9, 24)
    torch.manual_seed(123)
    y, dx, dA, dB = _grads(m, x, g)
    torch.manual_seed(123)
    keep = fastlora_mask(x, 0.25)      # the mask lora_linear drew (its first use of the generator)
    args = [t.detach().double().requires_grad_(True) for t in (x, m.weight, m.bias, m.lora_A, m.lora_B)]
    r = fastlora.lora_linear_reference(args[0], args[1], args[2], args[3], args[4], 2.0, 0.25, keep=keep)
    r.backward(g.double())
    args32 = [t.detach().requires_grad_(True) for t in (x, m.weight, m.bias, m.lora_A, m.lora_B)]
    p = fastlora.lora_linear_reference(*args32, 2.0, 0.25, keep=keep)
    p.backward(g)
    check("y", y, r.detach(), p.detach())
    for name, got, a64, a32 in (("dx", dx, args[0], args32[0]), ("dA", dA, args[3], args32[3]),
                                ("dB", dB, args[4], args32[4])):
        check(name, got, a64.grad, a32.grad)
    # eval: no dropout
    m.merge_weights = False
    m.eval()
    with torch.no_grad():
        ye = m(x)
    ref = x @ m.weight.t() + m.bias + 2.0 * (x @ m.lora_A.t()) @ m.lora_B.t()
    torch.testing.assert_close(ye, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out,enable", [(True, [True, False, True]), (False, [False, True])])
def test_merged_linear_matches_loralib(backend, fan_in_fan_out, enable):
    K, N, r = 32, 48, 2
    ours = MergedLoraLinear(K, N, r, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    theirs = loralib.MergedLinear(K, N, r=r, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        nn.init.normal_(ours.lora_B)
    sd = ours.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(sd)
    x, g = torch.randn(3, 5, K), torch.randn(3, 5, N)
    y, dx, dA, dB = _grads(ours, x, g)
    ly, ldx, ldA, ldB = _grads(theirs, x, g)
    theirs64 = loralib.MergedLinear(K, N, r=r, lora_alpha=4, enable_lora=enable,
                                    fan_in_fan_out=fan_in_fan_out).double()
    theirs64.load_state_dict({k: v.double() for k, v in sd.items()})
    ry, rdx, rdA, rdB = _grads(theirs64, x.double(), g.double())
    for name, a, b, ref in (("y", y, ly, ry), ("dx", dx, ldx, rdx), ("dA", dA, ldA, rdA), ("dB", dB, ldB, rdB)):
        check(name, a, ref, b)
    # disabled slices get exactly nothing from the adapter
    off = [i for i, e in enumerate(enable) if not e]
    per = N // len(enable)
    base = torch.nn.functional.linear(x, ours.weight.t() if fan_in_fan_out else ours.weight, ours.bias)
    for i in off:
        torch.testing.assert_close(y[..., i * per:(i + 1) * per], base[..., i * per:(i + 1) * per].detach(),
                                   rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        check("merged y", ours(x), ry, theirs(x))
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-6)


def test_block_lora_B_is_rank_rG_not_NxK():
    lora_B = torch.arange(12.0).reshape(6, 2)          # G=2 slices of per=3 rows, r=2
    rows = torch.tensor([0, 1, 2, 6, 7, 8])            # slices 0 and 2 of 3 enabled
    Bf = block_lora_B(lora_B, 2, rows, 9)
    assert Bf.shape == (9, 4)
    torch.testing.assert_close(Bf[0:3, 0:2], lora_B[0:3]), torch.testing.assert_close(Bf[6:9, 2:4], lora_B[3:6])
    assert Bf[3:6].abs().sum() == 0 and Bf[0:3, 2:].abs().sum() == 0 and Bf[6:9, :2].abs().sum() == 0


def test_bf16_base_fp32_adapters_vs_oracle(backend):
    m = LoraLinear(64, 32, 8, lora_alpha=16, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    with torch.no_grad():
        nn.init.normal_(m.lora_B, std=0.3)
    assert m.lora_A.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    x, g = torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(6, 32, dtype=torch.bfloat16)
    y, dx, dA, dB = _grads(m, x, g)
    t64 = [t.detach().double().requires_grad_(True) for t in (x, m.weight, m.bias, m.lora_A, m.lora_B)]
    r = fastlora.lora_linear_reference(*t64, 2.0)
    r.backward(g.double())
    # plain PEFT-style torch in the same dtypes: bf16 base GEMM + fp32 adapter path, then rounded
    xt = x.detach().requires_grad_(True)
    A, B = m.lora_A.detach().requires_grad_(True), m.lora_B.detach().requires_grad_(True)
    p = (nn.functional.linear(xt, m.weight, m.bias) + (xt.float() @ A.t() @ B.t()) * 2.0).to(torch.bfloat16)
    p.backward(g)
    check("y", y, r.detach(), p.detach())
    check("dx", dx, t64[0].grad, xt.grad)
    check("dA", dA, t64[3].grad, A.grad)
    check("dB", dB, t64[4].grad, B.grad)


def test_from_linear_shares_weight_and_conv1d():
    from transformers.pytorch_utils import Conv1D
    lin = nn.Linear(20, 12)
    m = LoraLinear.from_linear(lin, r=3, lora_alpha=6)
    assert m.weight is lin.weight and m.bias is lin.bias and not lin.weight.requires_grad
    assert (m.in_features, m.out_features, m.fan_in_fan_out) == (20, 12, False)
    conv = Conv1D(12, 20)                               # nf=12 out, nx=20 in, weight (20, 12)
    c = LoraLinear.from_linear(conv, r=3, lora_alpha=6)
    assert c.weight is conv.weight and c.fan_in_fan_out and (c.in_features, c.out_features) == (20, 12)
    x = torch.randn(4, 20)
    with torch.no_grad():
        nn.init.normal_(c.lora_B)
        torch.testing.assert_close(c(x), conv(x) + 2.0 * (x @ c.lora_A.t()) @ c.lora_B.t())
    qkv = MergedLoraLinear.from_linear(Conv1D(36, 20), r=2, enable_lora=[True, False, True])
    assert qkv.lora_A.shape == (4, 20) and qkv.lora_B.shape == (24, 2)


def test_init_and_scaling():
    torch.manual_seed(1)
    m = LoraLinear(256, 128, 16, lora_alpha=32)
    bound = 1 / math.sqrt(256)                          # kaiming_uniform(a=√5) == nn.Linear's bound
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    assert m.lora_B.abs().sum() == 0 and m.scaling == 2.0
    g = LoraLinear(256, 128, 16, lora_alpha=32, init="gaussian", use_rslora=True)
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.005 and g.scaling == 32 / 4
    assert m.scale_arg() == 2.0
    m.scaling = 3.0
    assert m.scale_arg() == 3.0


def test_float_scaling_is_one_cached_tensor_per_value(monkeypatch):
    """A module's float scaling reaches the op as a cached 0-d tensor: nothing allocated per forward, and a
    changed scaling is a new value (never a stale cache)."""
    from fastlora.ops import lora as ops
    seen = []
    real = ops.forward
    monkeypatch.setattr(ops, "forward", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    m = LoraLinear(8, 6, 2, lora_alpha=4, merge_weights=False).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        m(x), m(x)
        m.scaling = 5.0
        m(x)
    assert seen[0] is seen[1] and seen[0].item() == 2.0 and seen[2].item() == 5.0


def test_forward_goes_through_fused_op(monkeypatch):
    calls = []
    import fastlora.nn.lora as mod
    real = mod._lora_linear
    monkeypatch.setattr(mod, "_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = LoraLinear(8, 8, 2, merge_weights=False)
    m(torch.randn(2, 8)), m.eval(), m(torch.randn(2, 8))
    assert len(calls) == 2
    mm = MergedLoraLinear(8, 9, 1, enable_lora=[True, False, True])
    mm(torch.randn(2, 8))
    assert len(calls) == 3


@pytest.mark.parametrize("r", [0, -1, 13])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"r must be in \[1, min\(in_features, out_features\)\] = \[1, 12\]"):
        LoraLinear(20, 12, r)
    with pytest.raises(ValueError, match="LoraLinear.from_linear: r must be"):
        LoraLinear.from_linear(nn.Linear(20, 12), r)


def test_bad_arguments():
    with pytest.raises(TypeError, match="r must be an int"):
        LoraLinear(8, 8, 2.0)
    with pytest.raises(ValueError, match="lora_dropout must be a float in"):
        LoraLinear(8, 8, 2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        LoraLinear(8, 8, 2, init="xavier")
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D, got Conv2d"):
        LoraLinear.from_linear(nn.Conv2d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="len\\(enable_lora\\) must divide out_features=10"):
        MergedLoraLinear(8, 10, 1, enable_lora=[True, False, True])
    with pytest.raises(ValueError, match="enable at least one slice"):
        MergedLoraLinear(8, 9, 1, enable_lora=[False, False, False])
    with pytest.raises(ValueError, match=r"= \[1, 3\]"):             # per-slice out_features is 3
        MergedLoraLinear(8, 9, 4, enable_lora=[True, False, True])
    m = LoraLinear(8, 8, 2)
    with pytest.raises(TypeError, match=r"weight must have x's dtype torch.float16, got torch.float32: cast x to "
                                        r"torch.float32 \(x.to\(torch.float32\)\), or run the call inside torch.autocast"):
        m(torch.randn(2, 8, dtype=torch.float16))         # what to do, said: cast, or autocast


def test_compile_fullgraph_modules(backend):
    """torch.compile(fullgraph=True) traces LoraLinear / MergedLoraLinear (no graph breaks); the compiled and
    the eager model are each checked against a float64 copy (not only against each other, which would pass
    a bug both share), with loralib's modules in float32 as the same-dtype baseline."""
    torch.manual_seed(0)
    model = nn.Sequential(MergedLoraLinear(16, 24, 2, enable_lora=[True, False, True], merge_weights=False),
                          nn.Tanh(), LoraLinear(24, 8, 2, lora_alpha=4, merge_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p)
    lora = nn.Sequential(loralib.MergedLinear(16, 24, r=2, lora_alpha=1, enable_lora=[True, False, True]),
                         nn.Tanh(), loralib.Linear(24, 8, r=2, lora_alpha=4))
    lora.load_state_dict(model.state_dict())
    o64 = copy.deepcopy(lora).double()
    x = torch.randn(3, 16)

    def step(m, xx):
        m.zero_grad(set_to_none=True)
        y = m(xx)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
    torch._dynamo.reset()
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    eager, ref, base = step(model, x), step(o64, x.double()), step(lora, x)
    names = ["y"] + [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(compiled) == len(ref) == len(base) == len(names) == 7      # y, 2 x (bias, lora_A, lora_B)
    for name, c, e, r, b in zip(names, compiled, eager, ref, base):
        check(f"compiled {name}", c, r, b)
        check(f"eager {name}", e, r, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_peft_lora_linear(backend, dtype):
    """LoraLinear.from_linear vs PEFT's lora.Linear on the same base layer and adapter (PEFT keeps
    fp32 adapters on a half base): outputs and gradients, PEFT as the same-dtype baseline."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(dtype)
    peft = PeftLinear(copy.deepcopy(base), "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    peft.lora_A["default"].float(), peft.lora_B["default"].float()
    with torch.no_grad():
        nn.init.normal_(peft.lora_B["default"].weight, std=0.5)
    ours = LoraLinear.from_linear(base, 4, lora_alpha=8, adapter_dtype=torch.float32, merge_weights=False)
    with torch.no_grad():
        ours.lora_A.copy_(peft.lora_A["default"].weight), ours.lora_B.copy_(peft.lora_B["default"].weight)
    x, g = torch.randn(2, 5, 40, dtype=dtype), torch.randn(2, 5, 24, dtype=dtype)
    y, dx, dA, dB = _grads(ours, x, g)
    xp = x.clone().requires_grad_(True)
    yp = peft(xp)
    yp.backward(g)
    t64 = [t.detach().double().requires_grad_(True) for t in (x, base.weight, base.bias, ours.lora_A, ours.lora_B)]
    r = fastlora.lora_linear_reference(*t64, 2.0)
    r.backward(g.double())
    check("y", y, r.detach(), yp.detach())
    check("dx", dx, t64[0].grad, xp.grad)
    check("dA", dA, t64[3].grad, peft.lora_A["default"].weight.grad)
    check("dB", dB, t64[4].grad, peft.lora_B["default"].weight.grad)
