"""End to end on tiny HF models built from configs (random weights, no hub): a PEFT model vs the
same model after fastlora.patch — 20 AdamW steps with LoRA dropout 0.1, generate(), save/load.

Both sides see the same dropout masks: the PEFT reference's nn.Dropout modules are replaced by
ReplayDropout (tests/_replay.py), which draws from torch's generator exactly what lora_linear draws on the
backend under test (the CPU torch path's torch.rand mask, or a seed for the kernels' Philox mask) and builds the
same mask. Nothing else in these models draws random numbers (attention/residual/embedding dropouts are 0), so
draw i goes to the same layer on both sides.
"""
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastlora
import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from fastlora.integrations.checkpoint import load_peft_adapter
from tests._replay import replay_dropout

VOCAB = 64


def base_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(kind, dropout=0.1):
    base, targets = base_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))


def pin_backend(monkeypatch, name):
    """Run lora_linear on backend ``name`` (FASTLORA_BACKEND is read at every call)."""
    monkeypatch.setenv("FASTLORA_BACKEND", name)


def train(model, data, steps=20):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1234)
    model.train()
    losses = []
    for ids in data[:steps]:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().double())
    return torch.stack(losses)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.usefixtures("one_thread")
def test_20_steps_losses_generate_and_save_load(kind, monkeypatch, tmp_path):
    pin_backend(monkeypatch, "torch")        # 3 x 20 training steps: the interpreter is checked below
    fast = peft_model(kind)
    ref = replay_dropout(copy.deepcopy(fast))
    o64 = replay_dropout(copy.deepcopy(fast).double())
    report = fp.patch(fast)
    n_layers = sum(isinstance(m, peft_lora.Linear) for m in fast.modules())
    assert len(report.patched) == n_layers and not report.skipped and n_layers in (8, 14)
    torch.manual_seed(99)
    batches = [torch.randint(0, VOCAB, (2, 12)) for _ in range(2)]
    data = [batches[i % 2] for i in range(20)]          # a tiny repeated dataset it can learn
    calls = []
    real = fpl._lora_linear
    monkeypatch.setattr(fpl, "_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    l_fast, l_ref, l_64 = train(fast, data), train(ref, data), train(o64, data)
    assert len(calls) == 20 * n_layers
    assert l_ref[-1] < l_ref[0] - 0.05                 # it does learn something
    # the idiom, per step: |fastlora - fp64| <= 2 |PEFT fp32 - fp64| + 64 ulps of fp32 at the loss scale
    err, base = (l_fast - l_64).abs(), (l_ref - l_64).abs()
    print(f"{kind}: losses {l_fast[0]:.4f} -> {l_fast[-1]:.4f}; max |fastlora - fp64| {err.max():.2e}, "
          f"|PEFT - fp64| {base.max():.2e}, |fastlora - PEFT| {(l_fast - l_ref).abs().max():.2e}")
    atol = 64 * 2.0 ** -23 * l_64.abs().max()
    assert (err <= 2 * base + atol).all(), f"losses: fastlora err {err.max():.3e}, PEFT err {base.max():.3e}"
    assert (l_fast - l_ref).abs().max() < 1e-4, (l_fast - l_ref).abs().max()

    # generate(): identical adapters on both sides (copy fastlora's trained weights), greedy decoding
    ref.load_state_dict(fast.state_dict())
    fast.eval(), ref.eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        g_fast = fast.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        g_ref = ref.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(g_fast, g_ref), (g_fast, g_ref)

    # save -> load through PEFT (and through fastlora's loader)
    fast.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model(kind)[0], tmp_path).eval()
    fp.patch(reloaded)
    plain = base_model(kind)[0]
    load_peft_adapter(plain, str(tmp_path))
    plain.eval()
    ids = data[0]
    with torch.no_grad():
        want = fast(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_interpreted_kernels_end_to_end_gpt2(monkeypatch):
    """One short training step of the patched tiny GPT-2 on the Triton kernels (interpreted). A kernels package
    that fails to import, or a backend that cannot be selected, fails this test: both are fastlora's own."""
    pin_backend(monkeypatch, "triton")
    assert fastlora.core.backend.select_backend(torch.device("cpu"), "triton") == "triton"
    from fastlora.kernels import linear_bwd, linear_fwd
    assert callable(linear_fwd.lora_fwd) and callable(linear_bwd.lora_bwd)
    fast = peft_model("gpt2", dropout=0.1)
    with torch.no_grad():
        for n, p in fast.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.1)
    ref, o64 = replay_dropout(copy.deepcopy(fast)), replay_dropout(copy.deepcopy(fast).double())
    fp.patch(fast)
    ids = torch.randint(0, VOCAB, (1, 6))
    out = {}
    for name, m in (("fast", fast), ("ref", ref), ("o64", o64)):
        torch.manual_seed(5)
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        out[name] = (loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad})
    def ok(a, r, b):
        return (a - r).abs().max() <= 2 * (b - r).abs().max() + 64 * 2.0 ** -23 * r.abs().max()
    assert ok(out["fast"][0], out["o64"][0], out["ref"][0])
    for n, g in out["fast"][1].items():
        assert ok(g, out["o64"][1][n], out["ref"][1][n]), n
