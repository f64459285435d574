"""fastlora.patch on PEFT's LoRA on MoE experts (``target_parameters``): tiny transformers MoE models with LoRA on
attention and on both expert parameters. After patching, PEFT's parametrization never runs (spied), and logits,
loss and every LoRA gradient match PEFT (same dtype) and a float64 oracle (PEFT's own path on a float64 copy) by the
project's idiom; both backends; bf16; Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE and gpt-oss; state-dict keys, PEFT save
→ load and unpatch unchanged; what is not served is reported with its reason and runs PEFT's own forward.

Routing is pinned: the routers' top-k choice of the first run is replayed in every other run (float64 included),
so that a near-tie between two experts cannot send the runs being compared through different experts."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from torch.profiler import ProfilerActivity, profile

import fastlora
from fastlora.integrations import moe_peft
from tests._tolerance import assert_close, atol_for

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
H, I, E, K = 32, 24, 4, 2
COMMON = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, intermediate_size=64, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=I, num_experts=E, num_experts_per_tok=K)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(head_dim=8, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=40,
                       num_experts=E, num_experts_per_tok=K)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=8, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                     layer_types=["full_attention", "full_attention"])),
}


def build(family="qwen3_moe", dtype=torch.float32, targets=EXPERTS, adapter_dtype_autocast=True, seed=0, **cfg):
    """A tiny PEFT model: LoRA r 4 on q_proj / v_proj and on the experts' ``targets``; random expert weights and
    lora_B (PEFT's zero B would hide layout bugs; B std 0.1: the LoRA term ~10% of the base, see test_moe)."""
    model = base_model(family, dtype, seed, **cfg)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=list(targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, lcfg, autocast_adapter_dtype=adapter_dtype_autocast)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm


def base_model(family="qwen3_moe", dtype=torch.float32, seed=0, **cfg):
    """The transformers model build() wraps: the same weights for the same arguments."""
    cfg_cls, mdl_cls, kw = FAMILIES[family]
    config = getattr(transformers, cfg_cls)(**{**COMMON, **kw, **cfg})
    torch.manual_seed(seed)
    model = getattr(transformers, mdl_cls)(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.normal_(0, 0.2)
    return model.to(dtype)


def routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


@contextlib.contextmanager
def pinned_routing(model, choices: list):
    """Inside a router's forward, torch.topk records its indices into ``choices`` (when empty at entry) or replays
    them in call order (values gathered from the router's own scores, so its gradient flows as usual)."""
    real, replay, state = torch.topk, bool(choices), {"on": False, "i": 0}

    def topk(inp, k, *args, **kwargs):
        if not state["on"]:
            return real(inp, k, *args, **kwargs)
        if not replay:
            out = real(inp, k, *args, **kwargs)
            choices.append(out.indices.detach().clone())
            return out
        idx = choices[state["i"]]
        state["i"] += 1
        return torch.return_types.topk((inp.gather(-1, idx), idx))
    hooks = []
    for r in routers(model):
        hooks.append(r.register_forward_pre_hook(lambda *_: state.update(on=True)))
        hooks.append(r.register_forward_hook(lambda *_: state.update(on=False)))
    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = real
        for h in hooks:
            h.remove()


def step(model, ids, choices):
    """logits, loss (next-token cross-entropy, in float64 from the model's logits) and every trainable
    parameter's gradient of one training step (routing pinned)."""
    model.zero_grad(set_to_none=True)
    with pinned_routing(model, choices):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


@pytest.fixture
def peft_spy(monkeypatch):
    """Counts PEFT's parametrization: ParamWrapper._activate_lora and torch's register_parametrization."""
    calls = []
    real_act, real_reg = ParamWrapper._activate_lora, torch.nn.utils.parametrize.register_parametrization

    def act(self, *a, **k):
        calls.append("activate")
        return real_act(self, *a, **k)

    def reg(*a, **k):
        calls.append("register")
        return real_reg(*a, **k)
    monkeypatch.setattr(ParamWrapper, "_activate_lora", act)
    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization", reg)
    return calls


def oracle64(pm):
    """PEFT's own path on a float64 copy (experts in transformers' eager implementation: grouped_mm has no float64)."""
    o = copy.deepcopy(pm).double()
    o.base_model.model.set_experts_implementation("eager")
    return o


def compare_step(pm, backend, monkeypatch, peft_spy, dtype=torch.float32, T=9):
    """fastlora-patched step vs PEFT's (same dtype) vs the float64 oracle: logits, loss, every LoRA gradient."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    ref, o64 = copy.deepcopy(pm), oracle64(pm)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    choices: list = []
    peft_logits, peft_loss, peft_grads = step(ref, ids, choices)
    report = fastlora.patch(pm)
    served = [p for p, k in report.patched.items() if k.startswith(moe_peft.KIND)]
    assert len(served) == 2 and not report.skipped, report
    peft_spy.clear()
    logits, loss, grads = step(pm, ids, choices)
    assert peft_spy == [], "PEFT's parametrization ran under fastlora.patch"
    o_logits, o_loss, o_grads = step(o64, ids, choices)
    assert_close("logits", logits, o_logits, peft_logits)
    # a scalar: its error is the logits' errors averaged, so atol is the model dtype's (1 bf16 ulp, 4 fp32 ulps)
    assert_close("loss", loss, o_loss, peft_loss, atol=atol_for(dtype, o_loss))
    assert set(grads) == set(peft_grads) == set(o_grads)
    n_wrappers = sum(isinstance(m, ParamWrapper) for m in pm.modules())
    assert sum("experts" in n for n in grads) == 2 * n_wrappers, sorted(grads)     # A and B of every wrapper
    for n in grads:
        assert_close(n, grads[n], o_grads[n], peft_grads[n])
    return report


# ---------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qwen3_moe_matches_peft_and_float64(backend, monkeypatch, peft_spy):
    report = compare_step(build("qwen3_moe"), backend, monkeypatch, peft_spy)
    assert report.patched["base_model.model.model.layers.0.mlp.experts"] == \
        "peft.ParamWrapper(experts) gate_up_proj+down_proj on Qwen3MoeExperts"
    assert "base_model.model.model.layers.0.mlp.experts.base_layer" not in report.patched   # served through the outer


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_other_families_match_peft_and_float64(family, monkeypatch, peft_spy):
    compare_step(build(family), "torch", monkeypatch, peft_spy)


def test_gpt_oss_on_the_kernels(monkeypatch, peft_spy):
    """gpt-oss: transposed expert stacks, biases, the interleaved clamped gate, through the Triton path."""
    compare_step(build("gpt_oss"), "triton", monkeypatch, peft_spy)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
def test_bf16_model(backend, adapters, monkeypatch, peft_spy):
    """A bf16 model, adapters fp32 (PEFT's default autocast_adapter_dtype) or bf16. H 32 / I 16: the widths
    torch's grouped GEMM takes in bf16 (16-byte strides)."""
    pm = build("qwen3_moe", torch.bfloat16, adapter_dtype_autocast=adapters == "fp32", moe_intermediate_size=16)
    compare_step(pm, backend, monkeypatch, peft_spy, dtype=torch.bfloat16)


def test_lora_on_gate_up_only(monkeypatch, peft_spy):
    """One targeted parameter: a chain of one ParamWrapper, down_proj runs bare."""
    report = compare_step(build("qwen3_moe", targets=["mlp.experts.gate_up_proj"]), "torch", monkeypatch, peft_spy)
    assert report.patched["base_model.model.model.layers.1.mlp.experts"].endswith("gate_up_proj on Qwen3MoeExperts")


def test_router_gradient_reaches_earlier_layers(monkeypatch):
    """top_k_weights requires grad (the router sees hidden states that do): dropping its gradient would change
    layer 0's attention-LoRA gradients, which compare_step checks; here it is checked directly too."""
    pm = build("qwen3_moe")
    fastlora.patch(pm)
    block = pm.base_model.model.model.layers[1].mlp
    seen = []
    block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[2].requires_grad))
    pm(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()
    assert seen == [True]
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------
# PEFT's state, save / load, unpatch
# ---------------------------------------------------------------------------

def test_state_dict_save_load_and_unpatch(tmp_path, peft_spy):
    pm = build("qwen3_moe")
    keys = list(pm.state_dict())
    from peft import get_peft_model_state_dict
    adapter_keys = list(get_peft_model_state_dict(pm))
    fastlora.patch(pm)
    assert list(pm.state_dict()) == keys and list(get_peft_model_state_dict(pm)) == adapter_keys
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in adapter_keys
    ids = torch.randint(0, 64, (1, 7))
    choices: list = []
    with torch.no_grad(), pinned_routing(pm, choices):
        want = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model("qwen3_moe"), tmp_path)
    for (n, p), (_, q) in zip(sorted(pm.named_parameters()), sorted(loaded.named_parameters())):
        assert torch.equal(p, q), n
    peft_spy.clear()
    with torch.no_grad(), pinned_routing(loaded, choices):
        got = loaded(input_ids=ids).logits           # unpatched: PEFT's own path
    assert "activate" in peft_spy
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    restored = fastlora.unpatch(pm)
    assert "base_model.model.model.layers.0.mlp.experts" in restored
    assert not any("forward" in m.__dict__ for m in pm.modules())
    peft_spy.clear()
    with torch.no_grad(), pinned_routing(pm, choices):
        again = pm(input_ids=ids).logits
    assert "activate" in peft_spy
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# handed back to PEFT, per call or for good
# ---------------------------------------------------------------------------

def _experts_block(pm):
    return pm.base_model.model.model.layers[0].mlp


def _call(block, x):
    _, w, idx = block.gate(x)
    return block.experts(x, idx, w)


def test_disabled_merged_and_two_adapters_run_peft(peft_spy):
    pm = build("qwen3_moe")
    ref = copy.deepcopy(pm)
    fastlora.patch(pm)
    x = torch.randn(6, H)
    blk, rblk = _experts_block(pm), _experts_block(ref)
    with torch.no_grad():
        with pm.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(_call(blk, x), _call(rblk, x), rtol=1e-5, atol=1e-5)
        pm.merge_adapter()
        ref.merge_adapter()
        peft_spy.clear()
        torch.testing.assert_close(_call(blk, x), _call(rblk, x), rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        ref.unmerge_adapter()
        for m in (pm, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
            m.base_model.set_adapter(["default", "other"])
        with fastlora.trace() as t, pytest.warns(fastlora.FallbackWarning, match="2 active adapters"):
            got = _call(blk, x)
        torch.testing.assert_close(got, _call(rblk, x), rtol=1e-5, atol=1e-5)
        assert t.fused == 0 and sum(t.fallbacks.values()) == 1, t      # the experts call, counted as a fall-back
        assert any("2 active adapters" in why for why in t.fallbacks), t
        pm.base_model.set_adapter("default")
        with fastlora.trace() as t:
            _call(blk, x)
        assert t.fallbacks == {} and t.fused >= 1, t                    # served: counted as a fused call
    with pytest.raises(ValueError, match="mixed adapter batches"):       # PEFT's own refusal, unchanged
        blk.experts(x, *_call_args(blk, x), adapter_names=["default"] * 6)


def _call_args(block, x):
    _, w, idx = block.gate(x)
    return idx, w


def test_unservable_chains_are_reported_and_keep_peft():
    class PlainExperts(torch.nn.Module):          # Llama4-like: 3-D stacks, no @use_experts_implementation
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, H, 2 * I))
            self.down_proj = torch.nn.Parameter(torch.randn(E, I, H))

        def forward(self, x):
            return torch.bmm(torch.nn.functional.silu(torch.bmm(x, self.gate_up_proj)[..., :I]), self.down_proj)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = PlainExperts()

        def forward(self, x):
            return self.experts(x)
    pm = get_peft_model(Holder(), LoraConfig(r=2, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    with pytest.warns(UserWarning, match="keep their original forward"):
        report = fastlora.patch(pm)
    assert report.patched == {}
    assert "not a transformers @use_experts_implementation experts class" in report.skipped[
        "base_model.model.experts"]
    assert list(report.skipped) == ["base_model.model.experts"]          # one entry per chain
    with pytest.raises(ValueError, match="cannot patch base_model.model.experts"):
        fastlora.patch(get_peft_model(Holder(), LoraConfig(r=2, target_parameters=["experts.gate_up_proj"])),
                       strict=True)

    hooked = build("qwen3_moe")
    inner = hooked.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    inner.register_forward_pre_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="has forward hooks"):
        report = fastlora.patch(hooked)
    assert "has forward hooks" in report.skipped["base_model.model.model.layers.0.mlp.experts"]
    assert report.patched["base_model.model.model.layers.1.mlp.experts"].startswith(moe_peft.KIND)


def test_hook_added_after_patching_hands_the_call_back(peft_spy):
    """accelerate-style hooks inside the chain, added after patch: PEFT's forward runs them (warned once)."""
    pm = build("qwen3_moe")
    fastlora.patch(pm)
    blk = _experts_block(pm)
    seen = []
    blk.experts.get_base_layer().register_forward_pre_hook(lambda *a: seen.append(1))
    x = torch.randn(5, H)
    with pytest.warns(UserWarning, match="has forward hooks"):
        _call(blk, x)
    assert seen and "activate" in peft_spy


def test_deepcopy_stays_patched(peft_spy):
    pm = build("qwen3_moe")
    fastlora.patch(pm)
    twin = copy.deepcopy(pm)
    assert fastlora.is_patched(twin.base_model.model.model.layers[0].mlp.experts)
    peft_spy.clear()
    x = torch.randn(5, H)
    torch.testing.assert_close(_call(_experts_block(twin), x), _call(_experts_block(pm), x), rtol=0, atol=0)
    assert peft_spy == []


def test_under_cpu_autocast(peft_spy):
    """An fp32 model under torch.autocast(bf16): the experts compute in their own dtype (transformers' grouped_mm
    casts x to the weights' dtype; so does fastlora), attention's LoRA under autocast as the patched lora.Linear."""
    pm = build("qwen3_moe")
    ref, o64 = copy.deepcopy(pm), oracle64(pm)
    fastlora.patch(pm)
    ids = torch.randint(0, 64, (2, 7))
    choices: list = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pinned_routing(ref, choices):
            want = ref(input_ids=ids).logits
        peft_spy.clear()
        with pinned_routing(pm, choices):
            got = pm(input_ids=ids).logits
    assert peft_spy == []
    with pinned_routing(o64, choices):
        exact = o64(input_ids=ids).logits
    assert got.dtype == want.dtype
    assert_close("logits under autocast", got, exact, want)


def test_multi_adapter_model_refuses_expert_lora():
    """MultiAdapterModel swaps lora.Linear layers for banks; expert LoRA would silently run PEFT's active adapter
    for every sequence, so it refuses (docs/status.md, Not served: per-sequence adapters do not compose with experts yet)."""
    pm = build("qwen3_moe")
    with pytest.raises(ValueError, match="LoRA on MoE experts"):
        fastlora.MultiAdapterModel(pm)


# ---------------------------------------------------------------------------
# memory: PEFT's W + ΔW is never built
# ---------------------------------------------------------------------------

def test_no_experts_sized_tensor_under_patch():
    """One experts chain (E 8, H 32, I 32): the profiler sees every allocation, inside fastlora's ops too. PEFT
    builds W + s·B_e·A_e (E·2I·H) per call — the check catches it — fastlora nothing of half of E·H·I."""
    pm = build("qwen3_moe", num_experts=8, moe_intermediate_size=32)
    block = _experts_block(pm)
    x = torch.randn(8, H, requires_grad=True)
    limit_bytes = 8 * H * 32 // 2 * 4

    def biggest():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _call(block, x).sum().backward()
        return max(e.self_cpu_memory_usage for e in prof.events())
    assert biggest() >= limit_bytes                 # PEFT's parametrization
    fastlora.patch(pm)
    assert biggest() < limit_bytes


# ---------------------------------------------------------------------------
# the benchmark runs (toy sizes) and writes its CSV
# ---------------------------------------------------------------------------

def test_bench_moe_toy_run_writes_paired_ratios(tmp_path, one_thread):
    from benchmarks import bench_moe, common
    assert bench_moe.main(["--tiny", "--rounds", "2", "--out-dir", str(tmp_path)]) == 0
    rows = common.read_csv(tmp_path / "moe_lora_cpu.csv")
    got = {(r["case"], r["provider"], r["metric"]) for r in rows}
    for case in ("layer", "model"):
        for p in bench_moe.PROVIDERS:
            assert {(case, p, "median_ms"), (case, p, "saved_for_backward_MiB")} <= got
        assert {(case, "peft/fastlora", "time_ratio"), (case, "fastlora/attn_only", "time_ratio")} <= got
    saved = {(r["case"], r["provider"]): float(r["value"]) for r in rows if r["metric"] == "saved_for_backward_MiB"}
    assert saved[("layer", "fastlora")] < saved[("layer", "peft")]     # PEFT keeps W + ΔW for backward
