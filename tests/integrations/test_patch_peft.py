"""fastlora.patch on PEFT models: parity (outputs + gradients) with PEFT and a float64 oracle,
fallbacks, unsupported layers, state-dict identity, save/load, torch.compile."""
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from tests._replay import replay_dropout
from tests._tolerance import assert_close

def check(name, got, ref64, plain):
    """The project's idiom (tests/_tolerance.py): err vs float64 <= 2 x the same-dtype baseline's + atol."""
    assert_close(name, got, ref64, plain)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 24)
        self.up = nn.Linear(24, 40)
        self.conv = Conv1D(32, 40)               # GPT-2 style, weight (40, 32)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.conv(torch.tanh(self.up(x)))))


def tiny_peft(dropout=0.0, dtype=torch.float32, targets=("up", "conv", "down"), **cfg):
    torch.manual_seed(0)
    base = Tiny().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PEFT: "fan_in_fan_out set to True for Conv1D"
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=list(targets), **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.3)
    return pm


def run(model, x, g, seed=7):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = fpl._lora_linear
    monkeypatch.setattr(fpl, "_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_parity_fp32_train_and_eval(spy, dropout):
    pm = tiny_peft(dropout)
    ref = replay_dropout(copy.deepcopy(pm))
    o64 = replay_dropout(copy.deepcopy(pm).double())
    rep = fp.patch(pm)
    assert set(rep.patched) == {f"base_model.model.{n}" for n in ("up", "conv", "down")}
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    y, dx, grads = run(pm, x, g)
    assert len(spy) == 3
    ry, rdx, rgrads = run(ref, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    check("y", y, oy, ry)
    check("dx", dx, odx, rdx)
    assert set(grads) == set(rgrads) and len(grads) == 6
    for n in grads:
        check(n, grads[n], ograds[n], rgrads[n])
    pm.eval(), ref.eval(), o64.eval()
    with torch.no_grad():
        check("eval y", pm(x), o64(x.double()), ref(x))


def test_parity_bf16_base_fp32_adapters(spy):
    pm = tiny_peft(0.0, dtype=torch.bfloat16)
    a = pm.base_model.model.up
    assert a.lora_A["default"].weight.dtype == torch.float32 and a.base_layer.weight.dtype == torch.bfloat16
    ref, o64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fp.patch(pm)
    x, g = torch.randn(3, 24, dtype=torch.bfloat16), torch.randn(3, 16, dtype=torch.bfloat16)
    y, dx, grads = run(pm, x, g)
    assert len(spy) == 3 and y.dtype == torch.bfloat16
    ry, rdx, rgrads = run(ref, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    check("y", y, oy, ry)
    check("dx", dx, odx, rdx)
    for n in grads:
        check(n, grads[n], ograds[n], rgrads[n])


def test_runtime_fallbacks_merged_disabled_mixed_batch(spy):
    pm = tiny_peft()
    ref = copy.deepcopy(pm)
    fp.patch(pm)
    x = torch.randn(4, 24)
    pm.eval(), ref.eval()                            # PEFT allows adapter_names in eval mode only
    with torch.no_grad():
        with pm.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
        assert len(spy) == 0
        names = ["default", "__base__", "default", "__base__"]
        torch.testing.assert_close(pm(x, adapter_names=names), ref(x, adapter_names=names), rtol=0, atol=0)
        assert len(spy) == 0
        pm.merge_adapter(), ref.merge_adapter()
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
        assert len(spy) == 0
        pm.unmerge_adapter(), ref.unmerge_adapter()
        torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(spy) == 3
        for model in (pm, ref):                      # adapters cast after patching: bf16 on an fp32 base
            model.base_model.model.up.lora_A["default"].to(torch.bfloat16)
            model.base_model.model.up.lora_B["default"].to(torch.bfloat16)
        up, ref_up = pm.base_model.model.up, ref.base_model.model.up
        torch.testing.assert_close(up(x), ref_up(x), rtol=0, atol=0)       # PEFT's own forward ran
        torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(spy) == 5                         # 'up' handed back to PEFT, the other two fused
        for model in (pm, ref):
            model.base_model.model.up.lora_A["default"].to(torch.float32)
            model.base_model.model.up.lora_B["default"].to(torch.float32)
        merged = pm.merge_and_unload()               # PEFT's own API on a patched model
        assert not any(isinstance(m, peft_lora.LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), ref(x), rtol=1e-5, atol=1e-5)


def test_tensor_scaling(spy):
    pm = tiny_peft()
    ref = copy.deepcopy(pm)
    for model in (pm, ref):
        model.base_model.model.up.scaling["default"] = torch.tensor(0.75)
    fp.patch(pm)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_unsupported_layers_reported_warned_once_and_untouched():
    torch.manual_seed(0)
    base = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "up", "conv"],
                                             init_lora_weights=False))
        pm.add_adapter("lbias", LoraConfig(r=2, target_modules=["down"], lora_bias=True))   # DoRA is served now
        pm.add_adapter("other", LoraConfig(r=2, target_modules=["conv"]))
    pm.base_model.set_adapter(["default", "lbias", "other"])
    ref = copy.deepcopy(pm)
    sd_before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match=r"strict=True\): cannot patch base_model\.model\.emb: PEFT Embedding"):
        fp.patch(pm, strict=True)
    assert fp.unpatch(pm) == []                      # strict failure patched nothing
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = fp.patch(pm)
    mine = [x for x in w if "fastlora.patch" in str(x.message)]
    assert len(mine) == 1, [str(x.message) for x in w]
    assert rep.patched == {"base_model.model.up": "peft.Linear"}
    assert "Embedding" in rep.skipped["base_model.model.emb"]
    assert "lora_bias=True" in rep.skipped["base_model.model.down"]
    assert "2 active adapters ['default', 'other']" in rep.skipped["base_model.model.conv"]
    assert "base_model.model.down" in str(rep)
    x, z = torch.randint(0, 10, (3,)), torch.randn(2, 32)
    with torch.no_grad():                            # skipped layers keep PEFT's forward: same outputs
        torch.testing.assert_close(pm.base_model.model.emb(x), ref.base_model.model.emb(x), rtol=0, atol=0)
        torch.testing.assert_close(pm.base_model.model.down(z), ref.base_model.model.down(z), rtol=0, atol=0)
    assert not fp.is_patched(pm.base_model.model.down) and fp.is_patched(pm.base_model.model.up)
    for k, v in pm.state_dict().items():
        assert torch.equal(v, sd_before[k]), k


def test_lora_bias_and_hooked_base_are_skipped():
    pm = tiny_peft(targets=("up",), lora_bias=True)
    rep = fp.patch(pm, warn=False)
    assert "lora_bias" in rep.skipped["base_model.model.up"]
    pm2 = tiny_peft(targets=("up",))
    pm2.base_model.model.up.base_layer.register_forward_hook(lambda *a: None)
    assert "hooks" in fp.patch(pm2, warn=False).skipped["base_model.model.up"]


def test_state_dict_identical_save_load_unpatch(tmp_path, spy):
    pm = tiny_peft(0.1)
    before = {k: (v.data_ptr(), v.shape) for k, v in pm.state_dict().items()}
    fp.patch(pm)
    assert {k: (v.data_ptr(), v.shape) for k, v in pm.state_dict().items()} == before
    assert [n for n, _ in pm.named_buffers()] == [n for n, _ in tiny_peft(0.1).named_buffers()]
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tiny(), tmp_path)
    fp.patch(loaded)
    pm.eval(), loaded.eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pm(x), rtol=0, atol=0)
    assert len(spy) == 6
    assert sorted(fp.unpatch(pm)) == sorted(f"base_model.model.{n}" for n in ("up", "conv", "down"))
    assert not any("forward" in m.__dict__ for m in pm.modules())
    with torch.no_grad():
        pm(x)
    assert len(spy) == 6


def test_direct_constructor_installed_signature():
    """lora.Linear built directly: PEFT >= 0.14 takes a LoraConfig (config=...), 0.7-0.13 took
    r / lora_alpha / lora_dropout keywords. patch reads attributes only, so both serve; this runs
    the branch of the installed PEFT (the other was checked by hand with peft 0.13.2)."""
    import inspect
    base = nn.Linear(12, 10)
    if "config" in inspect.signature(peft_lora.Linear.__init__).parameters:
        lin = peft_lora.Linear(base, "default", config=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1),
                               r=2, lora_alpha=4)
    else:  # pragma: no cover - older PEFT
        lin = peft_lora.Linear(base, "default", r=2, lora_alpha=4, lora_dropout=0.1)
    nn.init.normal_(lin.lora_B["default"].weight)
    ref = copy.deepcopy(lin)
    assert fp.patch(lin).patched == {"": "peft.Linear"}
    lin.eval(), ref.eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_patched_peft(spy):
    """The patched model compiles with fullgraph=True (no try/skip: nothing here is optional); the compiled
    and the eager patched model are each checked against a float64 copy of the PEFT model, with PEFT in
    float32 as the same-dtype baseline (compiled vs eager alone would pass a bug both share)."""
    pm = tiny_peft(0.0)
    ref, o64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    fp.patch(pm)
    x, g = torch.randn(2, 24), torch.randn(2, 16)
    torch._dynamo.reset()
    y, dx, grads = run(torch.compile(pm, fullgraph=True, backend="aot_eager"), x, g)
    compiled = (y, dx, {n.removeprefix("_orig_mod."): t for n, t in grads.items()})
    assert len(spy) == 3                       # the fused op was traced, once per patched layer
    eager, base, oracle = run(pm, x, g), run(ref, x, g), run(o64, x.double(), g.double())
    for kind, got in (("compiled", compiled), ("eager", eager)):
        check(f"{kind} y", got[0], oracle[0], base[0])
        check(f"{kind} dx", got[1], oracle[1], base[1])
        assert set(got[2]) == set(oracle[2]) and len(got[2]) == 6
        for n in got[2]:
            check(f"{kind} {n}", got[2][n], oracle[2][n], base[2][n])


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        fp.patch({})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fp.unpatch(3)
