"""fastlora.patch on loralib models: Linear and MergedLinear (GPT-2 style c_attn, fan_in_fan_out)
give loralib's outputs and gradients (vs a float64 oracle), and loralib's utilities keep working."""
import copy

import loralib
import pytest
import torch
from torch import nn

import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from tests._replay import replay_dropout
from tests._tolerance import assert_close

def check(name, got, ref64, plain):
    """The project's idiom (tests/_tolerance.py): err vs float64 <= 2 x the same-dtype baseline's + atol."""
    assert_close(name, got, ref64, plain)


class Block(nn.Module):
    """A GPT-2-like block: merged QKV (Conv1D layout) with LoRA on q and v, an MLP, an embedding."""

    def __init__(self, d=16, dropout=0.0):
        super().__init__()
        self.wte = loralib.Embedding(20, d, r=2)
        self.c_attn = loralib.MergedLinear(d, 3 * d, r=2, lora_alpha=4, lora_dropout=dropout,
                                           enable_lora=[True, False, True], fan_in_fan_out=True)
        self.fc = loralib.Linear(3 * d, 24, r=4, lora_alpha=8, lora_dropout=dropout)
        self.plain = loralib.Linear(24, d, r=0)                   # r = 0: nothing to fuse

    def forward(self, x):
        return self.plain(torch.tanh(self.fc(torch.tanh(self.c_attn(x)))))


def make(dropout=0.0):
    torch.manual_seed(0)
    m = Block(dropout=dropout)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.5)
    loralib.mark_only_lora_as_trainable(m)
    return m


def run(model, x, g):
    torch.manual_seed(3)
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_parity_train_eval(dropout, monkeypatch):
    calls = []
    real = fpl._lora_linear
    monkeypatch.setattr(fpl, "_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make(dropout)
    ref, o64 = replay_dropout(copy.deepcopy(model)), replay_dropout(copy.deepcopy(model).double())
    rep = fp.patch(model, warn=False)
    assert rep.patched == {"c_attn": "loralib.MergedLinear", "fc": "loralib.Linear"}
    assert rep.skipped == {"wte": "loralib Embedding layers are not served", "plain": "r == 0 (no adapter)"}
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    y, dx, grads = run(model, x, g)
    assert len(calls) == 2
    ry, rdx, rgrads = run(ref, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    check("y", y, oy, ry)
    check("dx", dx, odx, rdx)
    assert sorted(grads) == ["c_attn.lora_A", "c_attn.lora_B", "fc.lora_A", "fc.lora_B",
                             "wte.lora_A", "wte.lora_B"]
    for n in grads:
        if n.startswith("wte"):
            continue                                  # unused in forward: None on every side
        check(n, grads[n], ograds[n], rgrads[n])
    # eval(): loralib merges the weights; the patched forward hands merged layers to loralib's GEMM
    model.eval(), ref.eval(), o64.eval()
    assert model.c_attn.merged and model.fc.merged
    with torch.no_grad():
        check("eval y", model(x), o64(x.double()), ref(x))
    assert len(calls) == 2
    model.train(), ref.train()
    assert not model.fc.merged
    with torch.no_grad():
        model(x)
    assert len(calls) == 4


def test_loralib_utilities_and_state_dict_unchanged():
    model = make()
    keys = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    lsd = set(loralib.lora_state_dict(model))
    fp.patch(model, warn=False)
    assert {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()} == keys
    assert set(loralib.lora_state_dict(model)) == lsd == {
        "wte.lora_A", "wte.lora_B", "c_attn.lora_A", "c_attn.lora_B", "fc.lora_A", "fc.lora_B"}
    for p in model.parameters():
        p.requires_grad_(True)
    loralib.mark_only_lora_as_trainable(model, bias="lora_only")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lsd | {"c_attn.bias", "fc.bias", "plain.bias"})   # every LoRALayer bias
    # a loralib checkpoint saved from the patched model loads into an unpatched one
    fresh = make()
    fresh.load_state_dict(loralib.lora_state_dict(model), strict=False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
    assert sorted(fp.unpatch(model)) == ["c_attn", "fc"]


def test_strict_names_the_unsupported_module():
    model = make()
    with pytest.raises(ValueError, match="cannot patch wte: loralib Embedding layers are not served"):
        fp.patch(model, strict=True)
    assert not any(fp.is_patched(m) for m in model.modules())
