"""QLoRA: LoRA over a bitsandbytes 4-bit / 8-bit base (fastlora.ops.qlora).

* patch / unpatch / a failed patch leave a quantized model bit-identical (parameters, buffers, every
  bnb QuantState field, logits): the bug where patch's own check (model.state_dict()) un-packed
  bnb's CPU-repacked 4-bit weights and re-quantized their absmax.
* parity with PEFT QLoRA against a float64 run of the dequantized model (tests/_tolerance.py):
  loss, logits, LoRA gradients; one layer in bf16 compute with fp32 adapters; 8-bit; dropout.
* the dequantized weight is never saved for backward and at most one is alive at a time.
* state-dict keys, PEFT save/load round trip, unpatch; LoraLinear.from_linear over Linear4bit.
"""
import copy
import itertools
import types
import weakref

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastlora  # noqa: E402
import fastlora.integrations.patching as fp  # noqa: E402
from fastlora.ops import qlora  # noqa: E402
from fastlora.core.dropout import new_seed
from fastlora.ops.lora import lora_linear_reference
from tests._replay import mask_of, replay_dropout  # noqa: E402
from tests._tolerance import assert_baseline_sane, assert_close, atol_for  # noqa: E402

DEQ = qlora.dequantize          # the real one (tests build oracles with it; the spy wraps it)
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


# ---------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Llama saved locally (nothing is downloaded)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load_4bit(tiny_dir, compute=torch.float32, double_quant=True):
    return LlamaForCausalLM.from_pretrained(
        tiny_dir, device_map="cpu", dtype=compute,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=double_quant,
                                               bnb_4bit_compute_dtype=compute))


def peft_of(model, dropout=0.0):
    torch.manual_seed(1)                        # the same lora_A / lora_B for every copy
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    return pm


def oracle64(tiny_dir, qmodel, pm, dropout=0.0):
    """The float64 run of the dequantized model: same dequantized weights, same LoRA weights."""
    ref = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                ref.get_submodule(name.replace(".base_layer", "")).weight.copy_(DEQ(m, torch.float64))
    o = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    lora = {k: v.double() for k, v in pm.state_dict().items() if "lora_" in k}
    missing = set(lora) - set(o.state_dict())
    assert not missing, missing
    o.load_state_dict(lora, strict=False)
    return o


def snapshot(model):
    """Every parameter and buffer (object and bytes) and every bnb quant-state field, read without side
    effects (no state_dict(): bnb's hooks change the model there)."""
    out = {}
    for name, m in model.named_modules():
        for pn, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None:
                continue
            out[f"{name}.{pn}"] = (id(t), type(t).__name__, t.detach().clone())
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                out[f"{name}.{pn}.quant_state"] = (id(qs), _fields(qs))
            for extra in ("CB", "SCB"):
                if getattr(t, extra, None) is not None:
                    out[f"{name}.{pn}.{extra}"] = getattr(t, extra).clone()
        st = getattr(m, "state", None)
        if st is not None and hasattr(st, "SCB"):
            out[f"{name}.state"] = _fields(st)
    return out


def _fields(obj):
    res = {}
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            res[k] = (id(v), v.dtype, v.clone())
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("bitsandbytes"):
            res[k] = (id(v), _fields(v))
        else:
            res[k] = v
    return res


def assert_same(a, b, path="model"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {set(a) ^ set(b)} changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} -> {b!r}"


@pytest.fixture
def spy(monkeypatch):
    """Counts fastlora's dequantizations, checking at each that no earlier one is still alive."""
    rec = types.SimpleNamespace(calls=[], live=[])

    def spying(layer, dtype):
        alive = [r for r in rec.live if r() is not None]
        assert not alive, f"{len(alive)} dequantized weight(s) still alive at a new dequantization"
        w = DEQ(layer, dtype)
        rec.live.append(weakref.ref(w))
        rec.calls.append(tuple(w.shape))
        return w

    monkeypatch.setattr(qlora, "dequantize", spying)
    return rec


def logits_of(pm, ids):
    with torch.no_grad():
        return pm(ids).logits


# ---------------------------------------------------------------------------- 1. the bug

def test_patch_unpatch_and_failed_patch_leave_quantized_model_bit_identical(tiny_dir, monkeypatch):
    pm = peft_of(load_4bit(tiny_dir))
    pm.eval()
    ids = torch.randint(0, 64, (2, 8))
    y0 = logits_of(pm, ids)       # an eval no-grad forward: bnb repacks 4-bit weights on AVX512-BF16 CPUs
    snap = snapshot(pm)

    def unpatched_and_unchanged():
        assert not any(fastlora.is_patched(m) for m in pm.modules())
        assert_same(snap, snapshot(pm))
        assert torch.equal(logits_of(pm, ids), y0)

    # the reported case: patch must neither raise nor change anything (it used to un-pack via state_dict)
    rep = fastlora.patch(pm)
    assert len(rep.patched) == 4 and not rep.skipped
    assert_same(snap, snapshot(pm))
    assert torch.equal(logits_of(pm, ids), y0)
    assert fastlora.unpatch(pm)
    unpatched_and_unchanged()

    # forced failures: an exception in the middle of the loop, and the after-check firing
    real_state, made = fp._State, []

    def failing_state(kind):
        made.append(kind)
        if len(made) == 3:
            raise RuntimeError("boom")
        return real_state(kind)

    monkeypatch.setattr(fp, "_State", failing_state)
    with pytest.raises(RuntimeError, match="boom"):
        fastlora.patch(pm)
    monkeypatch.undo()
    unpatched_and_unchanged()

    prints = itertools.count()                       # every fingerprint differs from the one before
    monkeypatch.setattr(fp, "_fingerprint", lambda layer: {"a": next(prints)})
    with pytest.raises(RuntimeError, match="patch undone"):
        fastlora.patch(pm)
    monkeypatch.undo()
    unpatched_and_unchanged()


def test_fingerprint_has_no_side_effects_on_a_repacked_4bit_layer(tiny_dir):
    """The root cause, pinned: state_dict() changes a CPU-repacked Linear4bit; _fingerprint must not."""
    q = load_4bit(tiny_dir)
    q.eval()
    with torch.no_grad():
        q(torch.randint(0, 64, (1, 4)))
    layer = q.model.layers[0].self_attn.q_proj
    if not qlora.packed_for_cpu(layer):
        pytest.skip("bitsandbytes did not repack the 4-bit weight on this CPU (no AVX512-BF16)")
    snap = snapshot(q)
    assert fp._fingerprint(q) == fp._fingerprint(q)
    assert_same(snap, snapshot(q))
    q.state_dict()                                   # what the old fingerprint called
    assert not qlora.packed_for_cpu(layer)           # ... and it un-packs (re-quantizing the absmax)


# ---------------------------------------------------------------------------- 2. parity with PEFT

def run(model, ids, seed=5):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_parity_with_peft_qlora_and_float64(tiny_dir, spy, dropout):
    q = load_4bit(tiny_dir)
    pm, ref = peft_of(q, dropout), replay_dropout(peft_of(load_4bit(tiny_dir), dropout))
    o64 = replay_dropout(oracle64(tiny_dir, q, pm, dropout))
    keys = list(pm.state_dict().keys())
    pm.train(), ref.train(), o64.train()
    rep = fastlora.patch(pm)
    assert set(rep.patched.values()) == {"peft.bnb.Linear4bit"} and len(rep.patched) == 4
    assert list(pm.state_dict().keys()) == keys
    ids = torch.randint(0, 64, (2, 8))
    loss, logits, grads = run(pm, ids)
    assert len(spy.calls) == 8                              # 4 layers: forward + backward each dequantize once
    rloss, rlogits, rgrads = run(ref, ids)
    oloss, ologits, ograds = run(o64, ids)
    assert_baseline_sane("logits", rlogits, ologits, ulps=2**10)   # PEFT computes the same model (4-bit
    assert_close("loss", loss, oloss, rloss)                       # dequant exact; fp32 through 1 layer)
    assert_close("logits", logits, ologits, rlogits)
    assert set(grads) == set(rgrads) == set(ograds) and len(grads) == 8
    for n in grads:
        assert_close(n, grads[n], ograds[n], rgrads[n])
    fastlora.unpatch(pm)                              # PEFT's own forward again: PEFT's logits bit for bit
    pm.eval(), ref.eval()
    assert torch.equal(logits_of(pm, ids), logits_of(ref, ids))


def _bnb_pair(kind, n=48, k=64, compute=torch.float32, bias=True, quant="nf4", double_quant=True):
    """A quantized bnb layer and its PEFT LoRA wrapper (r 4, fp32 adapters), weights from torch.manual_seed."""
    torch.manual_seed(3)
    w, b = torch.randn(n, k) * 0.1, torch.randn(n) * 0.1 if bias else None
    if kind == "4bit":
        base = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute, quant_type=quant)
        base.weight = bnb.nn.Params4bit(w.to(compute), requires_grad=False, quant_type=quant,
                                        compress_statistics=double_quant)
    else:
        base = bnb.nn.Linear8bitLt(k, n, bias=bias, has_fp16_weights=False, threshold=0.0)
        base.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    if bias:
        base.bias = nn.Parameter(b.to(compute))
    return base.to("cpu")                                   # bnb quantizes on the move to a device


def _layer_case(kind, compute, dropout=0.0, **quant):
    base = _bnb_pair(kind, compute=compute, **quant)
    assert qlora.base_reason(base) is None
    wrap = nn.Sequential()
    wrap.add_module("lin", base)
    wrap.is_loaded_in_4bit, wrap.is_loaded_in_8bit = kind == "4bit", kind == "8bit"   # PEFT's bnb dispatch
    pm = get_peft_model(wrap, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lin"]))
    lay = pm.base_model.model.lin
    lay.get_base_layer().bias.requires_grad_(True)          # a trainable bias (PEFT's bias="all"): dbias checked
    torch.manual_seed(4)
    with torch.no_grad():
        nn.init.normal_(lay.lora_B["default"].weight, std=0.2)
    return pm, lay


@pytest.mark.parametrize("kind,compute,quant", [
    ("4bit", torch.float32, {}), ("4bit", torch.bfloat16, {}), ("8bit", torch.float32, {}),
    ("4bit", torch.float16, {"quant": "fp4", "double_quant": False})])
def test_layer_parity_with_peft_and_float64(spy, kind, compute, quant):
    pm, lay = _layer_case(kind, compute, **quant)
    base, A, B = lay.get_base_layer(), lay.lora_A["default"].weight, lay.lora_B["default"].weight
    assert A.dtype == torch.float32 and type(lay).__name__ == ("Linear4bit" if kind == "4bit" else "Linear8bitLt")
    pm.train()
    x = torch.randn(3, 5, 64, dtype=compute)
    g = torch.randn(3, 5, 48, dtype=compute)

    def go(fn, xx, gg):
        xx = xx.detach().clone().requires_grad_(True)
        A.grad = B.grad = base.bias.grad = None
        y = fn(xx)
        y.backward(gg)
        return y.detach(), xx.grad, A.grad.clone(), B.grad.clone(), base.bias.grad.clone()

    ry = go(pm, x, g)                                       # PEFT (unpatched)
    W = DEQ(base, torch.float64)
    bias64, A64, B64 = base.bias.detach().double(), A.detach().double(), B.detach().double()
    leaves = [t.clone().requires_grad_(True) for t in (bias64, A64, B64)]
    x64 = x.double().requires_grad_(True)
    y64 = lora_linear_reference(x64, W, leaves[0], leaves[1], leaves[2], 2.0)
    y64.backward(g.double())
    oy = (y64.detach(), x64.grad, leaves[1].grad, leaves[2].grad, leaves[0].grad)
    assert fastlora.patch(pm).patched
    got = go(pm, x, g)
    assert len(spy.calls) == 2
    for name, a, o, r in zip(("y", "dx", "dA", "dB", "dbias"), got, oy, ry):
        assert a.dtype == r.dtype, name
        assert_close(name, a, o, r)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dropout_matches_reference_with_the_same_seed(spy, monkeypatch, backend):
    """Same seed, same mask as the reference given that backend's mask (auto = the interpreted kernels here);
    the torch backend draws the mask once (kept bit-packed, never drawn again in backward)."""
    from fastlora.ops import lora as reference
    draws = []
    real_keep = reference.draw_packed              # QLoRA is the LoRA op with a dequantizing weight source
    monkeypatch.setattr(reference, "draw_packed", lambda *a, **k: draws.append(1) or real_keep(*a, **k))
    monkeypatch.setattr(reference, "draw_keep", lambda *a, **k: (_ for _ in ()).throw(AssertionError("redrawn")))
    pm, lay = _layer_case("4bit", torch.float32)
    base, A, B = lay.get_base_layer(), lay.lora_A["default"].weight, lay.lora_B["default"].weight
    x = torch.randn(4, 64, requires_grad=True)
    y = fastlora.qlora_linear(x, base, A, B, 2.0, 0.25, True, seed=11, backend=backend)
    y.sum().backward()
    assert len(draws) == (1 if backend == "torch" else 0) and len(spy.calls) == 2
    keep = mask_of("torch" if backend == "torch" else "triton", 11, 4, 64, 0.25)
    W = DEQ(base, torch.float64)
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y64 = lora_linear_reference(x64, W, base.bias.double(), A64, B64, 2.0, 0.25, keep=keep)
    y64.sum().backward()
    Wf = DEQ(base, torch.float32)
    x32, A32, B32 = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y32 = lora_linear_reference(x32, Wf, base.bias.detach(), A32, B32, 2.0, 0.25, keep=keep)
    y32.sum().backward()
    assert_close("y", y, y64, y32)
    for name, a, o, r in (("dx", x.grad, x64.grad, x32.grad), ("dA", A.grad, A64.grad, A32.grad),
                          ("dB", B.grad, B64.grad, B32.grad)):
        assert_close(name, a, o, r)


# ---------------------------------------------------------------------------- 3. memory

@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dequantized_weight_never_saved_nor_kept(spy, monkeypatch, backend):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    pm, lay = _layer_case("4bit", torch.float32, dropout=0.1)
    fastlora.patch(pm)
    pm.train()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(6, 64, requires_grad=True)               # M=6, K=64, N=48, r=4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pm(x)
    assert saved and (48, 64) not in saved and (64, 48) not in saved, saved
    assert len(spy.calls) == 1 and all(r() is None for r in spy.live)   # forward's W gone before backward
    y.sum().backward()
    assert len(spy.calls) == 2 and all(r() is None for r in spy.live)
    assert lay.lora_A["default"].weight.grad is not None and x.grad is not None


def test_model_never_holds_two_dequantized_weights(tiny_dir, spy):
    pm = peft_of(load_4bit(tiny_dir))
    fastlora.patch(pm)
    pm.train()
    out = pm(torch.randint(0, 64, (1, 6)), labels=torch.randint(0, 64, (1, 6)))
    assert len(spy.calls) == 4
    out.loss.backward()                                      # the spy asserts at every dequantization
    assert len(spy.calls) == 8 and all(r() is None for r in spy.live)


# ---------------------------------------------------------------------------- 4. fallbacks, save/load

def test_runtime_fallbacks_hand_back_to_peft(tiny_dir, spy):
    pm, lay = _layer_case("4bit", torch.bfloat16)
    ref = copy.deepcopy(pm)
    rep = fastlora.patch(pm)
    assert not rep.fallbacks or all("eval forward without grad" in w for w in rep.fallbacks.values())
    x = torch.randn(2, 64)                                   # fp32 x, bf16 compute, fp32 adapters: the QLoRA
    with torch.no_grad(), fastlora.trace() as t:             # recipe, fused
        pm.train()(x)
        with pm.disable_adapter():
            pm(x.bfloat16())
        pm(x.bfloat16())
    assert len(spy.calls) == 2 and t.fused == 2 and t.fallbacks == {"adapters disabled": 1}
    for m in (pm, ref):                                      # bf16 adapters: PEFT rounds x to them for the
        m.base_model.model.lin.lora_A["default"].to(torch.bfloat16)   # adapter branch, its base to bf16 too:
        m.base_model.model.lin.lora_B["default"].to(torch.bfloat16)   # handed back, warned once
    with torch.no_grad(), pytest.warns(fastlora.FallbackWarning, match=r"float32 x into a torch.bfloat16-compute"):
        for _ in range(2):
            assert torch.equal(pm(x), ref(x))
    assert len(spy.calls) == 2
    rep = fastlora.patch(copy.deepcopy(ref))
    assert all("float32 x outside torch.autocast" in w for w in rep.fallbacks.values()) and rep.fallbacks


def test_save_load_round_trip_and_state_dict_keys(tiny_dir, tmp_path):
    pm = peft_of(load_4bit(tiny_dir))
    keys = list(pm.state_dict().keys())
    fastlora.patch(pm)
    assert list(pm.state_dict().keys()) == keys
    ids = torch.randint(0, 64, (2, 8))
    pm.eval()
    y = logits_of(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "adapter")
    again.eval()
    rep = fastlora.patch(again)
    assert len(rep.patched) == 4
    assert torch.equal(logits_of(again, ids), y)


def test_eight_bit_model_patched(tiny_dir, spy):
    def load_8bit():
        return LlamaForCausalLM.from_pretrained(tiny_dir, device_map="cpu",
                                                quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    q = load_8bit()
    pm, ref = peft_of(q), peft_of(load_8bit())
    o64 = oracle64(tiny_dir, q, pm)
    pm.train(), ref.train(), o64.train()            # bnb's CPU training path (MatMul8bitFp): x·deq(W)ᵀ too
    rep = fastlora.patch(pm)
    assert set(rep.patched.values()) == {"peft.bnb.Linear8bitLt"} and len(rep.patched) == 4
    ids = torch.randint(0, 64, (2, 8))
    loss, logits, grads = run(pm, ids)
    assert len(spy.calls) == 8
    rloss, rlogits, rgrads = run(ref, ids)
    oloss, ologits, ograds = run(o64, ids)
    assert_baseline_sane("logits", rlogits, ologits, ulps=2**10)
    assert_close("loss", loss, oloss, rloss)
    assert_close("logits", logits, ologits, rlogits)
    assert set(grads) == set(rgrads) == set(ograds) and len(grads) == 8
    for n in grads:
        assert_close(n, grads[n], ograds[n], rgrads[n])


# ---------------------------------------------------------------------------- 5. module, errors

def test_lora_linear_from_linear4bit():
    base = _bnb_pair("4bit")
    m = fastlora.LoraLinear.from_linear(base, r=4, lora_alpha=8)
    assert isinstance(m, fastlora.QLoraLinear) and m.base_layer is base and m.lora_A.dtype == torch.float32
    assert {"lora_A", "lora_B", "base_layer.weight", "base_layer.bias"} <= set(m.state_dict())
    assert any(k.startswith("base_layer.weight.") for k in m.state_dict())      # bnb's quant-state entries
    with torch.no_grad():
        nn.init.normal_(m.lora_B, std=0.2)
    x = torch.randn(5, 64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    W = DEQ(base, torch.float64)
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    y64 = lora_linear_reference(x64, W, base.bias.double(), A64, B64, 2.0)
    y64.sum().backward()
    Wf = DEQ(base, torch.float32)
    x32, A32, B32 = (t.detach().clone().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    y32 = lora_linear_reference(x32, Wf, base.bias.detach(), A32, B32, 2.0)
    y32.sum().backward()
    assert_close("y", y, y64, y32)
    for name, a, o, r in (("dx", x.grad, x64.grad, x32.grad), ("dA", m.lora_A.grad, A64.grad, A32.grad),
                          ("dB", m.lora_B.grad, B64.grad, B32.grad)):
        assert_close(name, a, o, r)
    with pytest.raises(NotImplementedError, match="quantized"):
        m.merge()
    with pytest.raises(ValueError, match=r"r must be in \[1, min"):
        fastlora.LoraLinear.from_linear(base, r=0)
    with pytest.raises(TypeError, match="from_linear"):
        fastlora.QLoraLinear(64, 48, r=4)


def test_bad_input_errors_name_the_argument():
    base = _bnb_pair("4bit")
    A, B = torch.zeros(4, 64), torch.zeros(48, 4)
    with pytest.raises(TypeError, match="base_layer: base layer is Linear"):
        fastlora.qlora_linear(torch.randn(2, 64), nn.Linear(64, 48), A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        fastlora.qlora_linear(torch.randn(2, 64), base, torch.zeros(4, 63), B, 1.0)
    with pytest.raises(ValueError, match="weight must have shape"):
        fastlora.qlora_linear(torch.randn(2, 63), base, A, B, 1.0)
    with pytest.raises(TypeError, match="layer: "):
        fastlora.LoraLinear.from_linear(bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=True), r=4)


def test_bench_qlora_dry_run(tmp_path, monkeypatch):
    """benchmarks/bench_qlora.py runs end to end on a tiny shape and writes its CSV (no timing asserted)."""
    from benchmarks import bench_qlora, common
    monkeypatch.delenv("TRITON_INTERPRET")               # the benchmark times the CPU user's (torch) path
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    threads = torch.get_num_threads()
    try:
        bench_qlora.main(["--d", "64", "--tokens", "8", "--r", "4", "--trials", "2", "--warmup", "0",
                          "--components", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = common.read_csv(tmp_path / "qlora_4bit_p0.1_cpu.csv")
    assert [r["provider"] for r in rows] == ["fastlora", "peft"] and float(rows[0]["ratio_to_peft"]) > 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        bench_qlora.main(["--out-dir", str(tmp_path)])


def test_gradient_checkpointing_replays_the_same_dropout(tiny_dir, spy):
    """Checkpointing re-runs the forward (a third dequantization); torch restores the RNG, so the
    recomputed seed, mask, loss and gradients are the run's without checkpointing, bit for bit."""
    ids = torch.randint(0, 64, (2, 8))
    res = []
    for gc in (False, True):
        q = load_4bit(tiny_dir)
        if gc:
            q.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = peft_of(q, dropout=0.1)
        fastlora.patch(pm)
        res.append(run(pm.train(), ids))
    assert len(spy.calls) == 8 + 12
    assert torch.equal(res[0][0], res[1][0])
    for n in res[0][2]:
        assert torch.equal(res[0][2][n], res[1][2][n]), n


def test_load_peft_adapter_into_a_quantized_model(tiny_dir, tmp_path):
    """fastlora.load_peft_adapter on a plain 4-bit model (no PEFT): the adapters come up in fp32 (not in the
    packed weight's uint8) as QLoraLinear layers, and the logits equal PEFT's own loaded QLoRA model."""
    pm = peft_of(load_4bit(tiny_dir))
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    # train mode (dropout 0: the same maths): in eval, bnb's CPU inference kernel repacks the 4-bit weight with
    # bf16 absmax, a different rounding from the exact dequantization both sides otherwise share
    want = PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "ad", is_trainable=True).train()(ids).logits
    plain = load_4bit(tiny_dir)
    fastlora.load_peft_adapter(plain, str(tmp_path / "ad"))
    got = plain.train()(ids).logits
    layers = [m for m in plain.modules() if isinstance(m, fastlora.QLoraLinear)]
    assert len(layers) == len(TARGETS) and all(m.lora_A.dtype == torch.float32 for m in layers)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- 6. the QLoRA recipe, autocast

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe_model(tiny_dir, kind, compute, gc):
    """What most QLoRA guides run: a quantized load, prepare_model_for_kbit_training (norms, embeddings and the
    head cast to float32, so float32 activations reach bf16/fp16-compute 4-bit layers; gradient checkpointing with
    input gradients unless ``gc`` is None; "plain": PEFT's default reentrant checkpointing), LoRA on 7 projections."""
    from peft import prepare_model_for_kbit_training
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute) if kind == "4bit"
             else BitsAndBytesConfig(load_in_8bit=True))
    q = LlamaForCausalLM.from_pretrained(tiny_dir, device_map="cpu", dtype=compute, quantization_config=quant)
    kwargs = None if gc in (None, "reentrant") else {"use_reentrant": False}
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=gc is not None,
                                        gradient_checkpointing_kwargs=kwargs)
    torch.manual_seed(1)
    pm = get_peft_model(q, LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.2)
    return q, pm.train()


def recipe_oracle(tiny_dir, q, pm):
    """float64 model with the quantized model's weights: dequantized bnb weights, every other parameter as the
    recipe left it (float32 copies of bf16-loaded norms and embeddings), the same LoRA weights."""
    o = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64),
                       LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                o.base_model.model.get_submodule(name).weight.copy_(DEQ(m, torch.float64))
        for n, p in pm.named_parameters():
            if type(p).__name__ not in ("Params4bit", "Int8Params"):
                o.get_parameter(n.replace(".base_layer", "") if "lora_" not in n else n).copy_(p.double())
    return o.train()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind,compute,gc", [
    ("4bit", torch.bfloat16, None), ("4bit", torch.bfloat16, "reentrant"), ("4bit", torch.bfloat16, "non-reentrant"),
    ("4bit", torch.float16, None), ("8bit", torch.bfloat16, "reentrant")])
def test_qlora_recipe_runs_fused_on_every_layer(tiny_dir, monkeypatch, backend, kind, compute, gc):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    q, pm = recipe_model(tiny_dir, kind, compute, gc)
    _, ref = recipe_model(tiny_dir, kind, compute, gc)
    o64 = recipe_oracle(tiny_dir, q, pm)
    rep = fastlora.patch(pm)
    assert len(rep.patched) == 7 and not rep.skipped
    assert not any("float32" in w for w in rep.fallbacks.values())       # the recipe is not a predicted fall-back
    first = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.dtype == torch.float32
    ids = torch.randint(0, 64, (2, 8))
    with fastlora.trace() as t:
        loss, _, grads = run(pm, ids)
    assert t.fallbacks == {} and len(t.layers) == 7 and all(c.fused for c in t.layers.values())
    if gc != "non-reentrant":                 # reentrant checkpointing runs every forward twice; torch's non-
        assert t.fused == (7 if gc is None else 14)   # reentrant one stops recomputing once it has what it needs
    rloss, _, rgrads = run(ref, ids)
    oloss, _, ograds = run(o64, ids)
    assert_close("loss", loss, oloss, rloss)
    lora = [n for n in rgrads if "lora_" in n]
    assert set(grads) == set(rgrads) and len(lora) == 14
    for n in lora:
        assert_close(n, grads[n], ograds[n], rgrads[n])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_recipe_layer_float32_x_into_half_compute(spy, monkeypatch, backend, compute, dropout):
    """One layer: float32 x, float32 adapters, a bf16/fp16-compute 4-bit base. PEFT's maths: the base in the compute
    dtype on x cast to it, the adapter branch in float32 on x itself, the sum in float32. y, dx, dA, dB, dbias
    against PEFT and the float64 oracle; x is the only (M, K) tensor saved for backward (no rounded copy)."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    pm, lay = _layer_case("4bit", compute, dropout)
    ref = replay_dropout(copy.deepcopy(pm))
    base, A, B = lay.get_base_layer(), lay.lora_A["default"].weight, lay.lora_B["default"].weight
    rbase, rA, rB = (getattr(ref.base_model.model.lin, n) for n in ("base_layer", "lora_A", "lora_B"))
    rA, rB = rA["default"].weight, rB["default"].weight
    x, g = torch.randn(3, 5, 64), torch.randn(3, 5, 48)
    fastlora.patch(pm)
    pm.train(), ref.train()

    def go(model, leaves):
        torch.manual_seed(5)
        xx = x.clone().requires_grad_(True)
        for t in leaves:
            t.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = model(xx)
        y.backward(g)
        return (y.detach(), xx.grad) + tuple(t.grad.clone() for t in leaves), saved, xx
    with fastlora.trace() as t:
        got, saved, xx = go(pm, (A, B, base.bias))
    assert t.fused == 1 and len(spy.calls) == 2 and got[0].dtype == torch.float32
    big = [s for s in saved if s.dim() and s.shape[-1] == 64 and s.numel() >= 15 * 64]
    assert all(s.data_ptr() == xx.data_ptr() and s.dtype == torch.float32 for s in big), \
        [(tuple(s.shape), s.dtype) for s in big]
    want, _, _ = go(ref, (rA, rB, rbase.bias))
    torch.manual_seed(5)
    seed = new_seed(x.device) if dropout else 0
    W = DEQ(base, torch.float64)
    x64, A64, B64, b64 = (tt.detach().double().requires_grad_(True) for tt in (x, A, B, base.bias))
    y64 = lora_linear_reference(x64, W, b64, A64, B64, 2.0, dropout, seed=seed)
    y64.backward(g.double())
    o = (y64.detach(), x64.grad, A64.grad, B64.grad, b64.grad)
    for name, a, oo, r in zip(("y", "dx", "dA", "dB", "dbias"), got, o, want):
        assert a.dtype == r.dtype, name
        assert_close(name, a, oo, r)


def _amp_oracle(base, A, B, amp, compute):
    """float64 weights as autocast reads them: the dequantized weight, the bias (in the compute dtype for a 4-bit
    layer, as bitsandbytes casts it) and the adapters rounded to the autocast dtype; x is not rounded."""
    kind = qlora.quant_kind(base)
    bias = base.bias.detach() if kind == "8bit" else base.bias.detach().to(compute)
    return (DEQ(base, torch.float32).to(amp).double(), bias.to(amp).double(),
            A.detach().to(amp).double(), B.detach().to(amp).double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind,compute", [("4bit", torch.float32), ("4bit", torch.bfloat16), ("8bit", torch.float32)])
def test_qlora_under_cpu_autocast_runs_fused(spy, monkeypatch, backend, kind, compute):
    """Inside torch.autocast(bf16) bitsandbytes' F.linear and PEFT's adapter matmuls run in bf16; the fused op runs
    on operands cast to bf16 (the weight dequantized to it), a 4-bit layer's result back in x's dtype, an 8-bit
    one's in bf16, as PEFT's. y, dx, dA, dB, dbias within 2x PEFT's own error (atol 1 bf16 ulp: bf16 GEMM results)."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    amp = torch.bfloat16
    pm, lay = _layer_case(kind, compute)
    ref = copy.deepcopy(pm)
    base, A, B = lay.get_base_layer(), lay.lora_A["default"].weight, lay.lora_B["default"].weight
    rlay = ref.base_model.model.lin
    x, g = torch.randn(3, 5, 64), torch.randn(3, 5, 48)
    fastlora.patch(pm)
    pm.train(), ref.train()

    def go(model, leaves):
        xx = x.clone().requires_grad_(True)
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=amp):
            y = model(xx)
        y.backward(g.to(y.dtype))
        return (y.detach(), xx.grad) + tuple(t.grad.clone() for t in leaves)
    with fastlora.trace() as t:
        got = go(pm, (A, B, base.bias))
    assert t.fused == 1 and t.fallbacks == {} and len(spy.calls) == 2
    want = go(ref, (rlay.lora_A["default"].weight, rlay.lora_B["default"].weight, rlay.get_base_layer().bias))
    assert got[0].dtype == want[0].dtype == (amp if kind == "8bit" else torch.float32)
    W, b64, A64, B64 = (t.requires_grad_(t.dim() == 1 or t.shape != (48, 64)) for t in _amp_oracle(base, A, B, amp,
                                                                                                     compute))
    x64 = x.double().requires_grad_(True)
    y64 = lora_linear_reference(x64, W, b64, A64, B64, 2.0)
    y64.backward(g.double())
    o = (y64.detach(), x64.grad, A64.grad, B64.grad, b64.grad)
    for name, a, oo, r in zip(("y", "dx", "dA", "dB", "dbias"), got, o, want):
        assert a.dtype == r.dtype, name
        assert_close(name, a, oo, r, atol=atol_for(amp, oo))


def test_qlora_linear_module_traced_and_its_output_modifiable_in_place():
    torch.manual_seed(0)
    m = fastlora.LoraLinear.from_linear(_bnb_pair("4bit", compute=torch.bfloat16), r=4, lora_alpha=8)
    with torch.no_grad():
        nn.init.normal_(m.lora_B, std=0.2)
    x0, g = torch.randn(2, 3, 64), torch.randn(2, 3, 48)

    def step(in_place):
        x = x0.clone().requires_grad_(True)
        m.lora_A.grad = m.lora_B.grad = None
        y = m(x)                                         # float32 x into a bf16-compute layer: the mixed op
        assert y.dtype == torch.float32 and y._base is None
        if in_place:
            y += 1.0
            y *= 2.0
        else:
            y = (y + 1.0) * 2.0
        y.backward(g)
        return x.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()
    with fastlora.trace(m) as t:
        got = step(True)
    assert t.layers["<root>"].fused == 1
    for a, b in zip(got, step(False)):
        assert torch.equal(a, b)
