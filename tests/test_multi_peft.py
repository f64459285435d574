"""Multi-adapter LoRA vs PEFT: mixed-batch forward (``model(x, adapter_names=[...])``) and checkpoint loading.

A two-layer model with PEFT adapters of ranks {1, 4, 8, 16, 64} (and rsLoRA on some) runs a batch whose
sequences use different adapters ("__base__" = none). fastlora's MultiAdapterModel swaps PEFT's layers
for MultiLoraLinear (Triton kernels, interpreted) and must match a float64 oracle at least as well as
PEFT does in the same dtype (tests/_tolerance.py idiom); PEFT itself must match the oracle (sanity).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fastlora.bank import AdapterBank, load_peft_adapter, read_peft_checkpoint  # noqa: E402
from fastlora.multi import MultiAdapterModel  # noqa: E402
from tests._tolerance import assert_baseline_sane, assert_close  # noqa: E402

RANKS = {"r1": 1, "r4": 4, "r8": 8, "r16": 16, "r64": 64}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(48, 40)
        self.v = nn.Linear(40, 56)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def peft_model(dtype, seed=0):
    """PEFT model with five adapters of mixed ranks; random (nonzero) B; adapter "r64" targets only q."""
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
    model = None
    for i, (name, r) in enumerate(RANKS.items()):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["q"] if name == "r64" else ["q", "v"],
                              use_rslora=i % 2 == 1)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def oracle64(model, x, names):
    """float64 forward of the PEFT model's maths, sequence by sequence, with one adapter each."""
    base = model.get_base_model()

    def layer(mod, h, name):
        y = h @ mod.base_layer.weight.double().t() + mod.base_layer.bias.double()
        if name in mod.lora_A:
            A, B = mod.lora_A[name].weight.double(), mod.lora_B[name].weight.double()
            y = y + mod.scaling[name] * (h @ A.t()) @ B.t()
        return y

    out = []
    for i, name in enumerate(names):
        h = layer(base.q, x[i].double(), name)
        out.append(layer(base.v, torch.relu(h), name))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_peft(dtype):
    model = peft_model(dtype)
    names = ["r8", "__base__", "r1", "r64", "r8", "r16", "r4", "r1"]   # unsorted, repeats, base, r64 only on q
    x = torch.randn(len(names), 3, 48).to(dtype)
    with torch.no_grad():
        ref = oracle64(model, x, names)
        y_peft = model(x, adapter_names=names)
        assert_baseline_sane("PEFT mixed batch", y_peft, ref)
        wrapped = MultiAdapterModel(model, backend="triton")
        y = wrapped(x, adapter_names=names)
        assert_close("MultiAdapterModel", y, ref, y_peft)
        with pytest.raises(ValueError, match="unknown adapter name"):
            wrapped(x, adapter_names=["r8"] * 7 + ["nope"])
        wrapped.restore()
        assert torch.equal(model(x, adapter_names=names), y_peft)       # PEFT layers are back


def test_load_peft_checkpoint(tmp_path):
    """save_pretrained -> load_peft_adapter into banks: same output as PEFT with that adapter active."""
    model = peft_model(torch.float32)
    model.save_pretrained(tmp_path, selected_adapters=["r16", "r64"])
    banks = {"q": AdapterBank(48, 40), "v": AdapterBank(40, 56)}
    load_peft_adapter(banks, tmp_path / "r16", "r16")
    for mod in ("q", "v"):
        layer = getattr(model.get_base_model(), mod)
        A, B, s = banks[mod].adapter("r16")
        assert torch.equal(A, layer.lora_A["r16"].weight) and torch.equal(B, layer.lora_B["r16"].weight)
        assert s == pytest.approx(layer.scaling["r16"], rel=1e-7)
    # r64 has no v layer: loading it for v is a clear error and changes no bank
    with pytest.raises(KeyError, match="lora_A"):
        load_peft_adapter(banks, tmp_path / "r64", "r64")
    assert banks["q"].names == ["r16"] and banks["v"].names == ["r16"]


def test_load_rank_mismatch(tmp_path):
    """A checkpoint whose tensors disagree with its config's rank is refused; no bank changes."""
    import json
    from safetensors.torch import save_file
    model = peft_model(torch.float32)
    model.save_pretrained(tmp_path, selected_adapters=["r4"])
    path = tmp_path / "r4"
    cfg, tensors = read_peft_checkpoint(path)
    cfg["r"] = 5
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    banks = {"q": AdapterBank(48, 40), "v": AdapterBank(40, 56)}
    banks["q"].add("x", torch.randn(3, 48), torch.randn(40, 3))
    snapshot = {k: v.clone() for k, v in banks["q"].state_dict().items()}
    with pytest.raises(ValueError, match="rank mismatch"):
        load_peft_adapter(banks, path, "r4")
    assert banks["q"].names == ["x"] and banks["v"].names == []
    for k, v in banks["q"].state_dict().items():
        assert torch.equal(v, snapshot[k])
    # rank_pattern is honoured: r = 4 for every module again -> loads
    cfg["rank_pattern"] = {"q": 4, "v": 4}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    load_peft_adapter(banks, path, "r4")
    assert banks["q"].ranks == [3, 4] and banks["v"].ranks == [4]
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(banks, tmp_path, "r4")


def test_dora_adapters_are_refused_not_served_as_plain_lora(tmp_path):
    """The bank computes plain LoRA: a DoRA adapter (PEFT use_dora) must not be loaded as one, silently dropping
    its magnitude — from a PEFT layer or from a checkpoint; nothing is added to any bank."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, target_modules=["q", "v"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        AdapterBank.from_peft_layer(model.base_model.model.q)
    with pytest.raises(ValueError, match="DoRA"):
        MultiAdapterModel(model)
    assert all(isinstance(getattr(model.base_model.model, n), peft.tuners.lora.Linear) for n in ("q", "v"))
    model.save_pretrained(tmp_path)
    banks = {"q": AdapterBank(48, 40), "v": AdapterBank(40, 56)}
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(banks, tmp_path, "d")
    assert banks["q"].names == [] and banks["v"].names == []
