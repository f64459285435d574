"""Patched models and layers survive torch.save / torch.load (full pickling) and copy.deepcopy: they come
back patched, bound to their own tensors, give the same outputs and gradients, and unpatch cleanly."""
import copy
import io

import loralib
import pytest
import torch
from torch import nn

import fastlora
import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from tests.integrations.test_patch_peft import run, tiny_peft

PEFT_LAYERS = sorted(f"base_model.model.{n}" for n in ("up", "conv", "down"))


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = fpl._lora_linear
    monkeypatch.setattr(fpl, "_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def same_run(a, b, x, g):
    ya, dxa, ga = run(a, x, g)
    yb, dxb, gb = run(b, x, g)                     # same seed inside run(): same dropout mask
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(dxa, dxb, rtol=0, atol=0)
    assert set(ga) == set(gb) and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_patched_peft_model_round_trip(spy, how):
    pm = tiny_peft(0.1)
    fp.patch(pm)
    back = save_load(pm) if how == "torch.save" else copy.deepcopy(pm)
    assert sorted(n for n, m in back.named_modules() if fp.is_patched(m)) == PEFT_LAYERS
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    same_run(pm, back, x, g)
    assert len(spy) == 6                           # 3 fused layers per model: the copy is fused too
    # the copy's forwards read the copy's tensors, not the original's
    with torch.no_grad():
        back.base_model.model.down.lora_B["default"].weight.zero_()
        with back.disable_adapter():
            base_only = back.base_model.model.down(torch.ones(3, 32))
        torch.testing.assert_close(back.base_model.model.down(torch.ones(3, 32)), base_only, rtol=1e-5, atol=1e-5)
        assert (pm.base_model.model.down(torch.ones(3, 32)) - base_only).abs().max() > 0.1
    assert sorted(fp.unpatch(back)) == PEFT_LAYERS
    assert not any("forward" in m.__dict__ for m in back.modules())


def test_unpatched_after_load_is_peft_again(spy):
    pm = tiny_peft(0.0)
    ref = copy.deepcopy(pm)
    fp.patch(pm)
    back = save_load(pm)
    fp.unpatch(back)
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)   # PEFT's own forward, bit for bit
    assert len(spy) == 0


def test_single_patched_layer_and_state_dict_keys(spy):
    layer = tiny_peft(0.0).base_model.model.up
    assert fp.patch(layer).patched == {"": "peft.Linear"}
    back = save_load(layer)
    assert fp.is_patched(back) and set(back.state_dict()) == set(layer.state_dict())
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    assert len(spy) == 2


def loralib_model():
    """loralib layers with nn.Dropout (loralib's p = 0 'dropout' is a lambda: unpicklable, patched or not)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        loralib.MergedLinear(16, 48, r=2, lora_alpha=4, lora_dropout=0.2, enable_lora=[True, False, True],
                             fan_in_fan_out=True),
        nn.Tanh(), loralib.Linear(48, 16, r=4, lora_alpha=8, lora_dropout=0.2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.5)
    loralib.mark_only_lora_as_trainable(model)
    return model


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_patched_loralib_model_round_trip(spy, how):
    model = loralib_model()
    fp.patch(model, warn=False)
    back = save_load(model) if how == "torch.save" else copy.deepcopy(model)
    assert sorted(n for n, m in back.named_modules() if fp.is_patched(m)) == ["0", "2"]
    same_run(model, back, torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    assert len(spy) == 4
    assert sorted(fp.unpatch(back)) == ["0", "2"]


def test_fastlora_modules_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(fastlora.LoraLinear(12, 10, r=2, lora_dropout=0.1),
                          fastlora.MergedLoraLinear(10, 12, r=2, enable_lora=[True, False, True]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    for back in (save_load(model), copy.deepcopy(model)):
        same_run(model, back, torch.randn(3, 12), torch.randn(3, 12))
