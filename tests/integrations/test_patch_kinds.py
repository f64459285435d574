"""fastlora.patch on layer kinds it does not serve (issue 19): it never fails a model for them, skips and reports
them, patches the rest, and its integrity check still guards what it patched. PEFT's lora.MultiheadAttention,
stacked tuners (PEFT mixed models: LoRA on LoHa / LoKr, LoHa on LoRA), a kind it cannot inspect; in-place ops on
a patched layer's output in training; lora_dropout p = 1 set after patching."""
import copy
import warnings

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from torch import nn

import fastlora
import fastlora.integrations.patching as fp
from tests._replay import replay_dropout
from tests._tolerance import assert_close
from tests.integrations.test_patch_peft import run, tiny_peft


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2)
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(self.mha(x, x, x)[0])


def attn_peft():
    torch.manual_seed(0)
    pm = get_peft_model(Attn(), LoraConfig(r=2, lora_alpha=4, target_modules=["mha", "lin"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.3)
    return pm


def test_multihead_attention_is_skipped_and_the_linear_served():
    pm = attn_peft()
    ref, o64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    assert fp._fingerprint(pm) == fp._fingerprint(pm)   # PEFT re-registers MHA Parameters: same storage
    with pytest.warns(fastlora.FallbackWarning, match="MultiheadAttention"):
        rep = fastlora.patch(pm)
    assert rep.patched == {"base_model.model.lin": "peft.Linear"}
    assert "MultiheadAttention" in rep.skipped["base_model.model.mha"]
    assert fastlora.is_patched(pm.base_model.model.lin) and not fastlora.is_patched(pm.base_model.model.mha)
    x, g = torch.randn(3, 2, 16), torch.randn(3, 2, 8)
    with fastlora.trace() as t:
        y, dx, grads = run(pm, x, g)
    assert t.fused == 1 and list(t.layers) == ["base_model.model.lin"]
    ry, rdx, rgrads = run(ref, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    assert_close("y", y, oy, ry)
    assert_close("dx", dx, odx, rdx)
    assert set(grads) == set(rgrads) and len(grads) == 6
    for n in grads:
        assert_close(n, grads[n], ograds[n], rgrads[n])


def test_integrity_check_still_guards_the_patched_layers(monkeypatch):
    """A patch that changed a patched layer's parameter (simulated: its storage replaced while patching) is undone."""
    pm = attn_peft()
    lin = pm.base_model.model.lin
    real, kept = fp._State, lin.lora_A["default"].weight.data

    def changing_state(kind):
        lin.lora_A["default"].weight.data = kept.clone()     # same values, new storage: a changed parameter
        return real(kind)
    monkeypatch.setattr(fp, "_State", changing_state)
    with pytest.raises(RuntimeError, match="patch undone"), warnings.catch_warnings():
        warnings.simplefilter("ignore", fastlora.FallbackWarning)
        fastlora.patch(pm)
    assert not any(fastlora.is_patched(m) for m in pm.modules())


def test_a_layer_that_cannot_be_inspected_is_skipped_and_the_rest_patched(monkeypatch):
    pm = tiny_peft()
    real = fp._peft_reason

    def broken(m):
        if m is pm.base_model.model.conv:
            raise AttributeError("'Linear' object has no attribute 'fan_in_fan_out'")
        return real(m)
    monkeypatch.setattr(fp, "_peft_reason", broken)
    rep = fastlora.patch(pm, warn=False)
    assert set(rep.patched) == {"base_model.model.up", "base_model.model.down"}
    assert rep.skipped["base_model.model.conv"].startswith("could not be inspected (AttributeError:")


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 20)

    def forward(self, x):
        return self.lin(x)


def mixed(first, second, names):
    """A PEFT mixed model: adapter ``second`` stacked on ``first`` in One.lin, both active, random weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # "adapter name should not contain 'lora_'"
        mm = get_peft_model(One(), first, adapter_name=names[0], mixed=True)
        mm.add_adapter(names[1], second)
    mm.set_adapter(list(names))
    return mm


LORA = LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False)
LOHA = LoHaConfig(r=2, target_modules=["lin"], init_weights=False)
LOKR = LoKrConfig(r=2, target_modules=["lin"], init_weights=False)


@pytest.mark.parametrize("inner", ["loha", "lokr"])
def test_lora_on_a_tuner_layer_is_not_served_from_the_innermost_weight(inner):
    mm = mixed(LOHA if inner == "loha" else LOKR, LORA, (inner, "lora"))
    outer = mm.base_model.model.lin
    assert type(outer).__module__ == "peft.tuners.lora.layer" and inner in type(outer.base_layer).__module__
    ref = copy.deepcopy(mm)
    rep = fastlora.patch(mm, warn=False)
    assert not rep.patched and "tuner layer stacked under LoRA" in rep.skipped["base_model.model.lin"]
    x = torch.randn(4, 10)
    torch.testing.assert_close(mm(x), ref(x), rtol=1e-6, atol=1e-6)
    assert (ref(x) - ref.base_model.model.lin.base_layer(x)).abs().max() > 1e-3   # LoRA's term is there


def test_a_tuner_layer_on_lora_keeps_the_lora_layer_served():
    mm = mixed(LORA, LOHA, ("lora", "loha"))
    ref = copy.deepcopy(mm)
    rep = fastlora.patch(mm, warn=False)
    assert rep.patched == {"base_model.model.lin.base_layer": "peft.Linear"}
    x = torch.randn(4, 10)
    with fastlora.trace() as t:
        y = mm(x)
    assert t.fused == 1
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_in_place_ops_on_a_patched_output_in_training(monkeypatch, backend, shape, dropout, dora):
    """y = layer(x); y += 1; y *= 2; backward: no error, gradients as PEFT's (and bitwise the fused layer's own
    gradients without the in-place ops: they add a constant and scale dY by 2, which the reference does too)."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    pm = tiny_peft(dropout, targets=("up",), use_dora=dora)
    layer = pm.base_model.model.up
    op = "dora" if dora else "lora"                           # the mask each op draws (tests/_replay.py)
    ref, o64 = replay_dropout(copy.deepcopy(layer), op), replay_dropout(copy.deepcopy(layer).double(), op)
    fp.patch(pm)
    x, g = torch.randn(*shape), torch.randn(*shape[:-1], 40)

    def step(m, x, g):
        torch.manual_seed(7)
        x = x.detach().clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        y = m(x)
        y += 1.0
        y *= 2.0
        y.backward(g)
        return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    with fastlora.trace() as t:
        got = step(layer, x, g)
    assert t.fused == 1
    want, o = step(ref, x, g), step(o64, x.double(), g.double())
    for name, a, r, oo in (("y", got[0], want[0], o[0]), ("dx", got[1], want[1], o[1])):
        assert_close(name, a, oo, r)
    assert set(got[2]) == set(want[2]) and got[2]
    for n in got[2]:
        assert_close(n, got[2][n], o[2][n], want[2][n])


def test_dropout_p_one_set_after_patching_behaves_as_peft():
    pm = tiny_peft(0.1)
    ref = copy.deepcopy(pm)
    fastlora.patch(pm)
    for model in (pm, ref):
        for m in model.modules():
            if hasattr(m, "lora_dropout") and isinstance(m.lora_dropout, nn.ModuleDict):
                m.lora_dropout["default"].p = 1.0
    x, g = torch.randn(2, 24), torch.randn(2, 16)
    with warnings.catch_warnings(record=True) as rec, fastlora.trace() as t:
        warnings.simplefilter("always")
        y, dx, grads = run(pm.train(), x, g)
    assert t.fallbacks == {fp.DROPOUT_1: 3}
    assert sum(issubclass(w.category, fastlora.FallbackWarning) for w in rec) == 3
    ry, rdx, rgrads = run(ref.train(), x, g)
    assert torch.equal(y, ry) and torch.equal(dx, rdx)
    for n in grads:
        assert torch.equal(grads[n], rgrads[n]) if rgrads[n] is not None else grads[n] is None, n
    pm.eval(), ref.eval()                                     # outside training: fused, p not applied
    with torch.no_grad(), fastlora.trace() as t:
        y = pm(x)
    assert t.fused == 3
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
