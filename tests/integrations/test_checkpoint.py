"""load_peft_adapter / save_peft_adapter: PEFT's format both ways, bad checkpoints, PEFT absent."""
import copy
import inspect
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastlora.integrations.checkpoint import AdapterLoadError, load_peft_adapter, save_peft_adapter
from fastlora.nn.lora import LoraLinear, MergedLoraLinear


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(10, 24)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(24, 24), "mlp": Conv1D(24, 24)})
                                    for _ in range(2))
        self.head = nn.Linear(24, 8, bias=False)
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = torch.tanh(b["mlp"](torch.tanh(b["q"](h))))
        return self.head(h)


def fresh(dtype=torch.float32):
    torch.manual_seed(0)                      # the same base weights every time
    return Net(dtype)


def peft_dir(tmp_path, dtype=torch.float32, **cfg):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "mlp"], **cfg}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(fresh(dtype), LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    pm.save_pretrained(tmp_path)
    return pm.eval()


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()})


def assert_unchanged(model, snap):
    mods, sd = snapshot(model)
    assert mods == snap[0]
    assert sd.keys() == snap[1].keys()
    for k, (v, req) in sd.items():
        assert torch.equal(v, snap[1][k][0]) and req == snap[1][k][1], k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_save_fastlora_load(tmp_path, dtype):
    pm = peft_dir(tmp_path, dtype, rank_pattern={"blocks.1.q": 2}, alpha_pattern={"mlp": 3})
    model = fresh(dtype)
    loaded = load_peft_adapter(model, str(tmp_path))
    assert sorted(loaded) == ["blocks.0.mlp", "blocks.0.q", "blocks.1.mlp", "blocks.1.q"]
    q1, m0 = model.blocks[1]["q"], model.blocks[0]["mlp"]
    assert isinstance(q1, LoraLinear) and q1.r == 2 and m0.fan_in_fan_out and m0.scaling == 3 / 4
    assert q1.lora_A.dtype == torch.float32 and q1.weight.dtype == dtype           # PEFT's default
    peft_q1 = pm.base_model.model.blocks[1]["q"]
    assert q1.weight is not peft_q1.base_layer.weight and torch.equal(q1.weight, peft_q1.base_layer.weight)
    assert torch.equal(q1.lora_B, peft_q1.lora_B["default"].weight)
    model.eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        ours, theirs, oracle = model(ids), pm(ids), copy.deepcopy(pm).double()(ids)
    # the idiom: error vs the float64 model <= 2x PEFT's same-dtype error + 2 ulps (64 for fp32)
    err, base = (ours.double() - oracle).abs().max(), (theirs.double() - oracle).abs().max()
    ulps = 64 if dtype == torch.float32 else 2
    assert err <= 2 * base + ulps * torch.finfo(dtype).eps * oracle.abs().max(), (err, base)


def test_fastlora_save_peft_load_and_round_trip(tmp_path):
    model = fresh()
    for i, b in enumerate(model.blocks):
        b["q"] = LoraLinear.from_linear(b["q"], r=2 + 2 * i, lora_alpha=4, merge_weights=False)
        b["mlp"] = LoraLinear.from_linear(b["mlp"], r=3, lora_alpha=6, merge_weights=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    config = save_peft_adapter(model, str(tmp_path))
    assert config["r"] == 3 and config["rank_pattern"] == {r"blocks\.0\.q": 2, r"blocks\.1\.q": 4}
    pm = PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    ids = torch.randint(0, 10, (2, 5))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), model(ids), rtol=1e-5, atol=1e-5)
        again = fresh()
        load_peft_adapter(again, str(tmp_path))
        torch.testing.assert_close(again.eval()(ids), model(ids), rtol=0, atol=0)
    # loading into existing LoraLinear modules overwrites their adapters in place
    keep = model.blocks[0]["q"]
    with torch.no_grad():
        keep.lora_B.zero_()
    load_peft_adapter(model, str(tmp_path))
    assert model.blocks[0]["q"] is keep and keep.lora_B.abs().sum() > 0


def _outputs_agree(ours, peft_model, ids, ulps=64):
    """The idiom at model level: ours vs a float64 copy of the PEFT model <= 2x PEFT's own error + ulps."""
    with torch.no_grad():
        got, theirs, oracle = ours(ids), peft_model(ids), copy.deepcopy(peft_model).double()(ids)
    err, base = (got.double() - oracle).abs().max(), (theirs.double() - oracle).abs().max()
    assert err <= 2 * base + ulps * torch.finfo(got.dtype).eps * oracle.abs().max(), (err, base)


def test_rslora_peft_save_fastlora_load(tmp_path):
    """use_rslora=True: s = alpha / sqrt(r) per module (r = 4 and, by rank_pattern, 2), as PEFT has it."""
    pm = peft_dir(tmp_path, use_rslora=True, rank_pattern={"blocks.1.q": 2})
    model = fresh()
    loaded = load_peft_adapter(model, str(tmp_path))
    assert len(loaded) == 4
    for name, m in loaded.items():
        want = pm.base_model.model.get_submodule(name).scaling["default"]
        assert m.use_rslora and m.scaling == pytest.approx(8 / m.r ** 0.5) and m.scaling == pytest.approx(want), name
    _outputs_agree(model.eval(), pm, torch.randint(0, 10, (2, 5)))


def test_rslora_fastlora_save_peft_load(tmp_path):
    model = fresh()
    for i, b in enumerate(model.blocks):
        b["q"] = LoraLinear.from_linear(b["q"], r=4, lora_alpha=8, use_rslora=True, merge_weights=False)
        b["mlp"] = LoraLinear.from_linear(b["mlp"], r=2 + i, lora_alpha=6, use_rslora=True, merge_weights=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    config = save_peft_adapter(model, str(tmp_path))
    assert config["use_rslora"] is True
    pm = PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            assert pm.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(m.scaling), name
    ids = torch.randint(0, 10, (2, 5))
    _outputs_agree(model.eval(), pm, ids)
    again = fresh()
    load_peft_adapter(again, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids), model(ids), rtol=0, atol=0)


def test_save_refuses_mixed_rslora(tmp_path):
    """PEFT's config holds one use_rslora: modules mixing True and False are refused, nothing written."""
    model = fresh()
    model.blocks[0]["q"] = LoraLinear.from_linear(model.blocks[0]["q"], r=2, use_rslora=True)
    model.blocks[1]["q"] = LoraLinear.from_linear(model.blocks[1]["q"], r=2, use_rslora=False)
    with pytest.raises(ValueError, match="mix use_rslora True and False"):
        save_peft_adapter(model, str(tmp_path))
    assert not os.listdir(tmp_path)


def _edit(tmp_path, config=None, drop=None, rename=None, reshape=None):
    cfg_file, w_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    if config:
        c = json.loads(cfg_file.read_text())
        c.update(config)
        cfg_file.write_text(json.dumps(c))
    t = load_file(w_file)
    if drop:
        del t[drop]
    if rename:
        t[rename[1]] = t.pop(rename[0])
    if reshape:
        t[reshape] = torch.zeros(5, t[reshape].shape[1])
    save_file(t, w_file)


K = "base_model.model.blocks.1.q."


@pytest.mark.parametrize("edit,message", [
    (dict(drop=K + "lora_B.weight"), r"missing key base_model\.model\.blocks\.1\.q\.lora_B\.weight"),
    (dict(rename=(K + "lora_A.weight", "base_model.model.blocks.1.k.lora_A.weight")),
     r"unexpected adapter weights for module 'blocks\.1\.k' \(no such module"),
    (dict(rename=(K + "lora_A.weight", K + "lora_A.default.weight")), r"unexpected key .*lora_A\.default"),
    (dict(reshape=K + "lora_A.weight"), r"module 'blocks\.1\.q': expected lora_A \(4, 24\)"),
    (dict(config={"r": 3}), r"module 'blocks\.0\.mlp': expected lora_A \(3, 24\)"),
    (dict(config={"r": 0}), r"module 'blocks\.0\.mlp': r must be in \[1, min"),
    (dict(config={"r": 25}), r"module 'blocks\.0\.mlp': r must be in \[1, min\(in_features, out_features\)\] "
                             r"= \[1, 24\]"),
    (dict(config={"target_modules": ["q", "mlp", "emb"]}), r"module 'emb' matched target_modules but is a "
                                                           r"Embedding"),
    (dict(config={"target_modules": ["q"]}), r"unexpected adapter weights for module 'blocks\.0\.mlp' "
                                             r"\(not matched"),
    (dict(config={"use_dora": True}), r"missing key base_model\.model\.blocks\.0\.mlp\.lora_magnitude_vector .*"
                                      r"\(use_dora=True\)"),
    (dict(config={"peft_type": "IA3"}), r"peft_type must be 'LORA'"),
])
def test_bad_checkpoints_raise_and_leave_model_unchanged(tmp_path, edit, message):
    peft_dir(tmp_path)
    _edit(tmp_path, **edit)
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(AdapterLoadError, match=message):
        load_peft_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)


def test_missing_files_and_bad_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(fresh(), str(tmp_path))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_peft_adapter("model", str(tmp_path))


def test_save_refuses_what_peft_cannot_express(tmp_path):
    model = fresh()
    with pytest.raises(ValueError, match="no fastlora LoraLinear modules"):
        save_peft_adapter(model, str(tmp_path))
    model.blocks[0]["q"] = MergedLoraLinear.from_linear(model.blocks[0]["q"], r=2, enable_lora=[True, False, True])
    with pytest.raises(TypeError, match="module 'blocks.0.q' is a MergedLoraLinear"):
        save_peft_adapter(model, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_load_without_peft_installed(tmp_path):
    """The loader needs only torch + safetensors: run it where `import peft` fails."""
    pm = peft_dir(tmp_path)
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        expect = pm(ids)
    torch.save({"ids": ids, "expect": expect}, tmp_path / "io.pt")
    code = f"""
import sys, torch
sys.modules["peft"] = None                      # any `import peft` now raises ImportError
from torch import nn
from transformers.pytorch_utils import Conv1D
{inspect.getsource(Net)}
{inspect.getsource(fresh)}
from fastlora.integrations.checkpoint import load_peft_adapter
io = torch.load({str(tmp_path / 'io.pt')!r})
m = fresh(); load_peft_adapter(m, {str(tmp_path)!r}); m.eval()
with torch.no_grad():
    torch.testing.assert_close(m(io["ids"]), io["expect"], rtol=1e-5, atol=1e-5)
assert "peft" not in {{k.split(".")[0] for k, v in sys.modules.items() if v is not None}}
print("OK")
"""
    env = dict(os.environ, FASTLORA_BACKEND="torch", TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
