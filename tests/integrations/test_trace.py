"""What runs is what the user is told (issue 19): fastlora.trace() counts fused calls and fall-backs per layer, a
fall-back warns once per layer and reason (fastlora.FallbackWarning), patch's report names the layers that will
fall back at run time and when. The parity of what runs is checked where each path is tested (test_patch_peft,
test_qlora, test_autocast); here: the counts, the names, the warnings, and that tracing off costs no recording."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastlora

import fastlora.integrations.peft_layers as fpl
import fastlora.core.tracing as ft
from fastlora.ops.bank import AdapterBank
from tests.ops.test_autocast import tiny_llama
from tests.integrations.test_patch_peft import tiny_peft


def fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, fastlora.FallbackWarning)]


def test_trace_counts_14_fused_calls_in_a_llama_training_step():
    pm = tiny_llama()                                   # 2 layers, LoRA on 7 projections each, dropout 0.1
    rep = fastlora.patch(pm)
    assert len(rep.patched) == 14 and not rep.skipped and not rep.fallbacks
    ids = torch.randint(0, 64, (2, 7))
    pm.train()
    with warnings.catch_warnings(record=True) as rec, fastlora.trace() as t:
        warnings.simplefilter("always")
        pm(input_ids=ids, labels=ids).loss.backward()
    assert t.fused == 14 and t.fallbacks == {} and not fallback_warnings(rec)
    assert list(t.layers) == list(rep.patched)          # names: the module paths patch reported, in call order
    assert all(c.fused == 1 and not c.fallbacks for c in t.layers.values())
    table = str(t)
    assert table.startswith("fastlora.trace: 14 fused call(s), 0 fall-back(s), 14 layer(s)")
    assert all(name in table for name in rep.patched)
    pm(input_ids=ids)                                   # after the block: nothing more is recorded
    assert t.fused == 14


def test_mixed_batch_adapter_names_are_fallbacks_with_a_reason_warned_once_per_layer():
    pm = tiny_llama()
    ref = copy.deepcopy(pm).eval()
    fastlora.patch(pm)
    pm.eval()                                           # PEFT takes adapter_names= in eval mode only
    ids = torch.randint(0, 64, (2, 7))
    names = ["default", "__base__"]
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec, fastlora.trace() as t:
        warnings.simplefilter("always")                 # the once-per-layer rule is fastlora's own
        for _ in range(2):
            got = pm(input_ids=ids, adapter_names=names).logits
        with fastlora.trace() as inner:                 # nested blocks each record what ran inside them
            pm(input_ids=ids)
    assert t.fused == 14 and inner.fused == 14 and inner.fallbacks == {}
    assert t.fallbacks == {fpl.ADAPTER_NAMES: 28}
    assert all(c.fallbacks == {fpl.ADAPTER_NAMES: 2} and c.fused == 1 for c in t.layers.values())
    msgs = fallback_warnings(rec)
    assert len(msgs) == 14 and len(set(msgs)) == 14     # one per layer (and reason), naming the layer
    assert all("adapter_names=" in m and "runs PEFT's own forward" in m for m in msgs)
    assert any("layers.1.mlp.down_proj" in m for m in msgs)
    with torch.no_grad():
        assert torch.equal(got, ref(input_ids=ids, adapter_names=names).logits)   # PEFT's own forward ran
    assert "adapter_names= (PEFT's mixed batch): 2" in str(t)


def test_fallback_warning_category_can_be_filtered():
    pm = tiny_peft()
    fastlora.patch(pm)
    pm.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=fastlora.FallbackWarning)
        pm(torch.randn(2, 24), adapter_names=["default", "__base__"])
    assert not rec
    assert issubclass(fastlora.FallbackWarning, UserWarning)


def test_merged_and_disabled_calls_are_counted_but_not_warned():
    pm = tiny_peft()
    fastlora.patch(pm)
    pm.eval()
    x = torch.randn(3, 24)
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec, fastlora.trace() as t:
        warnings.simplefilter("always")
        with pm.disable_adapter():
            pm(x)
        pm.merge_adapter()
        pm(x)
        pm.unmerge_adapter()
        pm(x)
    assert t.fallbacks == {ft.DISABLED: 3, ft.MERGED: 3} and t.fused == 3
    assert not fallback_warnings(rec)


def _bank(k=8, n=6):
    bank = AdapterBank(k, n)
    bank.add("a", torch.randn(2, k), torch.randn(n, 2), alpha=2)
    return bank


def test_fastlora_modules_are_traced_and_named_by_the_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "lora": fastlora.LoraLinear(8, 6, r=2),
        "merged": fastlora.MergedLoraLinear(8, 6, r=2, enable_lora=[True, False]),
        "dora": fastlora.DoraLinear(8, 6, r=2),
        "multi": fastlora.MultiLoraLinear(nn.Linear(8, 6), _bank()),
    })
    x = torch.randn(3, 8)
    with fastlora.trace(model) as t:
        for name, m in model.items():
            m(x, ["a", None, "a"]) if name == "multi" else m(x)
        model["lora"](x)
    assert {n: c.fused for n, c in t.layers.items()} == {"lora": 2, "merged": 1, "dora": 1, "multi": 1}
    assert t.fused == 5 and t.fallbacks == {}
    with fastlora.trace() as t:                         # no model: class name and order of first call
        model["dora"](x), model["lora"](x), model["dora"](x)
    assert {n: c.fused for n, c in t.layers.items()} == {"DoraLinear#0": 2, "LoraLinear#0": 1}
    model.eval()                                        # merge_weights: eval() merges, forward runs W0 + s·B·A
    with warnings.catch_warnings(record=True) as rec, fastlora.trace(model) as t:
        warnings.simplefilter("always")
        model["lora"](x)
    assert t.fallbacks == {ft.MERGED: 1} and t.fused == 0 and not fallback_warnings(rec)


def test_tracing_off_records_nothing(monkeypatch):
    """Off, a call's cost is one check of the list fastlora.core.tracing.ACTIVE: record() is never reached."""
    def boom(*a, **k):
        raise AssertionError("record() called with tracing off")
    pm = tiny_peft()
    fastlora.patch(pm)
    lin = fastlora.LoraLinear(24, 8, r=2)
    monkeypatch.setattr(ft, "record", boom)
    assert not ft.ACTIVE
    pm(torch.randn(2, 24)).sum().backward()
    lin(torch.randn(2, 24))
    with pytest.raises(AssertionError, match="tracing off"), fastlora.trace():
        lin(torch.randn(2, 24))
    assert not ft.ACTIVE                                # the block closed despite the error


def test_report_names_layers_that_will_fall_back_and_when():
    pm = tiny_peft(1.0)                                 # lora_dropout p = 1: fastlora's dropout takes p < 1
    ref = copy.deepcopy(pm)
    rep = fastlora.patch(pm)
    assert set(rep.fallbacks) == set(rep.patched) and len(rep.patched) == 3
    assert all("training calls" in w and "p = 1" in w for w in rep.fallbacks.values())
    assert "falls back at run time  base_model.model.up: training calls" in str(rep)
    x = torch.randn(2, 24)
    pm.train(), ref.train()
    with warnings.catch_warnings(record=True) as rec, fastlora.trace() as t:
        warnings.simplefilter("always")
        y = pm(x)
    assert t.fallbacks == {fpl.DROPOUT_1: 3} and len(fallback_warnings(rec)) == 3
    assert torch.equal(y, ref(x))                       # p = 1 behaves as PEFT: the LoRA term dropped
    with fastlora.trace() as t:                         # outside training p does not apply: fused
        pm.eval(), ref.eval()
        y = pm(x)
    assert t.fused == 3 and not t.fallbacks
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def test_trace_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or None"):
        with fastlora.trace("model"):
            pass
