"""torch.autocast (AMP): patched PEFT / loralib layers and fastlora's modules run the fused op inside
autocast regions, with autocast's semantics (x, W, bias and the adapters cast to the autocast dtype, as
F.linear and PEFT's lora_A / lora_B nn.Linear are under autocast), and match PEFT / loralib under the same
autocast: outputs, dx and LoRA gradients against a float64 oracle, within the tolerance idiom.

The oracle is the model in float64 with every weight an autocast op reads (nn.Linear / Conv1D / LoRA
factors) rounded to the autocast dtype first: the maths autocast defines, without its activation roundings.
"""
import copy
import warnings

import loralib
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastlora
import fastlora.nn.lora as fm
import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from fastlora.core.backend import interpreting
from tests._replay import replay_dropout
from tests._tolerance import assert_baseline_sane, assert_close, atol_for
from tests.integrations.test_patch_loralib import make as make_loralib
from tests.integrations.test_patch_peft import tiny_peft

BF16 = torch.bfloat16


def oracle(model, amp):
    """float64 copy whose autocast-read weights are first rounded to ``amp``."""
    o = copy.deepcopy(model)
    with torch.no_grad():
        for m in o.modules():
            if isinstance(m, (nn.Linear, Conv1D, loralib.LoRALayer)):
                for p in m.parameters(recurse=False):
                    p.copy_(p.to(amp).to(p.dtype))
    return o.double()


def step(model, x, g, amp, device="cpu", seed=7):
    """One forward + backward; inside autocast(amp) unless amp is None (the oracle)."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=amp or BF16, enabled=amp is not None):
        y = model(x)
        y = getattr(y, "logits", y)
    y.backward(g.to(y.dtype))
    params = getattr(model, "_orig_mod", model).named_parameters()          # torch.compile'd: the model's names
    grads = {n: p.grad for n, p in params if p.requires_grad and p.grad is not None}
    return y.detach(), x.grad, grads


def check_bf16(model, ref, o64, x, g, spy, layers):
    """``model`` (fused) under CPU bf16 autocast: ``layers`` fused calls, all in bf16 (the spy), and its step
    vs ``ref`` (PEFT / loralib under the same autocast) and the float64 oracle ``o64``."""
    got = step(model, x, g, BF16)
    assert spy == [BF16] * layers
    compare(got, step(ref, x, g, BF16), step(o64, x.double(), g.double(), None), BF16)


def compare(got, ref, o64, amp, sane=True, atol_dtype=None):
    """got / ref: step() of the fused model / PEFT under autocast; o64: step() of the oracle. ``atol_dtype``: the
    dtype whose ulps the idiom's atol counts (default: each result's own dtype; see the callers)."""
    (y, dx, gr), (ry, rdx, rgr), (oy, odx, ogr) = got, ref, o64
    assert y.dtype == ry.dtype == amp
    pairs = [("y", y, ry, oy)] + ([("dx", dx, rdx, odx)] if dx is not None else [])
    assert set(gr) == set(rgr) and gr
    pairs += [(n, gr[n], rgr[n], ogr[n]) for n in gr]
    for name, a, b, o in pairs:
        assert a.dtype == b.dtype, name
        if sane:
            assert_baseline_sane(name, b.to(amp), o)
        assert_close(name, a, o, b, atol=None if atol_dtype is None else atol_for(atol_dtype, o))


def _dtype(operands):
    """The one dtype of the fused op's tensor operands (x, weight, bias, lora_A, lora_B), else the tuple."""
    dts = {t.dtype for t in operands if t is not None}
    return dts.pop() if len(dts) == 1 else tuple(None if t is None else t.dtype for t in operands)


@pytest.fixture
def spy(monkeypatch):
    """Records, per fused call, the dtype its operands were all cast to."""
    calls = []
    for mod in (fpl, fm):                      # where the patched forwards and the modules read the op
        real = mod._lora_linear
        monkeypatch.setattr(mod, "_lora_linear", lambda *a, _r=real, **k: calls.append(_dtype(a[:5])) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_peft_fp32_model_under_cpu_autocast(spy, dropout):
    pm = tiny_peft(dropout)                       # fp32 base, fp32 adapters: the usual AMP setup
    ref, o64 = replay_dropout(copy.deepcopy(pm)), replay_dropout(oracle(pm, BF16))
    assert len(fp.patch(pm).patched) == 3
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    check_bf16(pm, ref, o64, x, g, spy, 3)       # every LoRA layer fused, on bf16 operands
    for n, p in pm.named_parameters():            # fp32 adapters get fp32 gradients, as under autocast
        assert p.grad is None or p.grad.dtype == torch.float32, n


def test_patched_peft_bf16_base_fp32_adapters_under_cpu_autocast(spy):
    pm = tiny_peft(0.0, dtype=BF16)
    ref, o64 = copy.deepcopy(pm), oracle(pm, BF16)
    fp.patch(pm)
    x, g = torch.randn(3, 24), torch.randn(3, 16)  # fp32 input into a bf16 model: autocast casts it
    check_bf16(pm, ref, o64, x, g, spy, 3)


def test_patched_loralib_under_cpu_autocast(spy):
    model = make_loralib(0.2)
    ref, o64 = replay_dropout(copy.deepcopy(model)), replay_dropout(oracle(model, BF16))
    fp.patch(model, warn=False)
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    check_bf16(model, ref, o64, x, g, spy, 2)


class _Chain(nn.Module):
    """fc(tanh(c_attn(x))): the two layers of make_loralib, without the rest."""

    def __init__(self, c_attn, fc):
        super().__init__()
        self.c_attn, self.fc = c_attn, fc

    def forward(self, x):
        return self.fc(torch.tanh(self.c_attn(x)))


def test_fastlora_modules_under_cpu_autocast(spy):
    """LoraLinear / MergedLoraLinear vs loralib's maths (the same layers unpatched) under autocast."""
    model = make_loralib(0.0)
    fast = _Chain(fastlora.MergedLoraLinear.from_linear(Conv1D(48, 16), r=2, lora_alpha=4,
                                                        enable_lora=[True, False, True]),
                  fastlora.LoraLinear.from_linear(nn.Linear(48, 24), r=4, lora_alpha=8))
    fast.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("c_attn", "fc")})
    ref = _Chain(copy.deepcopy(model.c_attn), copy.deepcopy(model.fc))
    o64 = _Chain(oracle(ref.c_attn, BF16), oracle(ref.fc, BF16))
    for m in (fast, ref, o64):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 24)
    check_bf16(fast, ref, o64, x, g, spy, 2)


def test_compiled_patched_peft_under_cpu_autocast(spy):
    """torch.compile(fullgraph=True) of a patched model inside autocast (e.g. Trainer's torch_compile + bf16)."""
    pm = tiny_peft(0.0)
    ref, o64 = copy.deepcopy(pm), oracle(pm, BF16)
    fp.patch(pm)
    torch._dynamo.reset()
    cm = torch.compile(pm, fullgraph=True, backend="aot_eager")
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    check_bf16(cm, ref, o64, x, g, spy, 3)


def test_unservable_autocast_is_handed_back(spy):
    pm = tiny_peft(0.0)
    ref = copy.deepcopy(pm).double()
    assert len(fp.patch(pm).patched) == 3
    pm.double()                                   # autocast never casts float64: PEFT's forward runs
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
    assert spy == []


def tiny_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    return pm


def test_amp_training_step_of_a_patched_tiny_llama(spy):
    pm = tiny_llama()
    ref, o64 = replay_dropout(copy.deepcopy(pm)), replay_dropout(oracle(pm, BF16))
    rep = fp.patch(pm)
    assert len(rep.patched) == 14 and not rep.skipped
    ids = torch.randint(0, 64, (2, 7))
    g = torch.randn(2, 7, 64)
    got = step(pm, ids, g, BF16)
    assert spy == [BF16] * 14                     # one fused call per LoRA layer
    compare(got, step(ref, ids, g, BF16), step(o64, ids, g.double(), None), BF16, sane=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="needs CUDA with TRITON_INTERPRET unset or 0 (compiled kernels), as tests/kernels/test_gpu.py")
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_patched_peft_under_cuda_autocast(spy, amp):
    pm = tiny_peft(0.1).cuda()
    ref, o64 = replay_dropout(copy.deepcopy(pm)), replay_dropout(oracle(pm, amp))
    fp.patch(pm)
    x, g = torch.randn(2, 5, 24, device="cuda"), torch.randn(2, 5, 16, device="cuda")
    got = step(pm, x, g, amp, "cuda")
    assert spy == [amp] * 3
    compare(got, step(ref, x, g, amp, "cuda"), step(o64, x.double(), g.double(), None, "cuda"), amp)
