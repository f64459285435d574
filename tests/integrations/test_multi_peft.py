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

from fastlora.ops.bank import AdapterBank
from fastlora.integrations.checkpoint import load_peft_adapter_into_banks, read_peft_checkpoint
from fastlora.integrations.multi_peft import MultiAdapterModel
from tests._tolerance import assert_baseline_sane, assert_close  # noqa: E402

RANKS = {"r1": 1, "r4": 4, "r8": 8, "r16": 16, "r64": 64}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(48, 40)
        self.v = nn.Linear(40, 56)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def with_adapters(base, configs: dict):
    """PEFT model over ``base`` holding one adapter per (name, LoraConfig) of ``configs``, every LoRA weight random
    (nonzero B; A ~ N(0, 1/K), B ~ N(0, 1/r): O(1) outputs)."""
    model = None
    for name, cfg in configs.items():
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def peft_model(dtype, seed=0):
    """PEFT model with five adapters of mixed ranks; random (nonzero) B; adapter "r64" targets only q."""
    torch.manual_seed(seed)
    return with_adapters(Tiny().to(dtype), {
        name: peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["q"] if name == "r64" else ["q", "v"],
                              use_rslora=i % 2 == 1)
        for i, (name, r) in enumerate(RANKS.items())}).eval()


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
    """save_pretrained -> load_peft_adapter_into_banks: same output as PEFT with that adapter active."""
    model = peft_model(torch.float32)
    model.save_pretrained(tmp_path, selected_adapters=["r16", "r64"])
    banks = {"q": AdapterBank(48, 40), "v": AdapterBank(40, 56)}
    load_peft_adapter_into_banks(banks, tmp_path / "r16", "r16")
    for mod in ("q", "v"):
        layer = getattr(model.get_base_model(), mod)
        A, B, s = banks[mod].adapter("r16")
        assert torch.equal(A, layer.lora_A["r16"].weight) and torch.equal(B, layer.lora_B["r16"].weight)
        assert s == pytest.approx(layer.scaling["r16"], rel=1e-7)
    # r64 has no v layer: loading it for v is a clear error and changes no bank
    with pytest.raises(KeyError, match="lora_A"):
        load_peft_adapter_into_banks(banks, tmp_path / "r64", "r64")
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
        load_peft_adapter_into_banks(banks, path, "r4")
    assert banks["q"].names == ["x"] and banks["v"].names == []
    for k, v in banks["q"].state_dict().items():
        assert torch.equal(v, snapshot[k])
    # rank_pattern is honoured: r = 4 for every module again -> loads
    cfg["rank_pattern"] = {"q": 4, "v": 4}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    load_peft_adapter_into_banks(banks, path, "r4")
    assert banks["q"].ranks == [3, 4] and banks["v"].ranks == [4]
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter_into_banks(banks, tmp_path, "r4")


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
        load_peft_adapter_into_banks(banks, tmp_path, "d")
    assert banks["q"].names == [] and banks["v"].names == []


# ---------------------------------------------------------------------------
# ids travel with the call (a ContextVar), never as state on the layers
# ---------------------------------------------------------------------------

def _layers(wrapped):
    base = wrapped.model.get_base_model()
    return base.q, base.v


def test_nested_calls_and_shared_layers_see_their_own_names():
    """A call made from inside another call (here: from a forward pre-hook of the outer call's first layer) uses
    its own names; the outer call's later layer still sees the outer names. A second model sharing the same
    layer object (driving it with explicit ids) is unaffected by the outer call's names."""
    model = peft_model(torch.float32)
    outer_names, inner_names = ["r8", "r1", "__base__"], ["r16", "r4"]
    x, x_in = torch.randn(3, 2, 48), torch.randn(2, 2, 48)
    with torch.no_grad():
        ref_outer, ref_inner = oracle64(model, x, outer_names), oracle64(model, x_in, inner_names)
        y_peft_outer, y_peft_inner = model(x, adapter_names=outer_names), model(x_in, adapter_names=inner_names)
        wrapped = MultiAdapterModel(model, backend="torch")
        q, v = _layers(wrapped)
        shared = nn.Sequential(q)               # another model holding the same layer object
        seen = {}

        def hook(module, args):
            if "busy" not in seen:
                seen["busy"] = True                        # the hook's own calls pass through q again
                seen["inner"] = wrapped(x_in, adapter_names=inner_names)
                ids = q.bank.ids(["r4", "r64"])
                seen["shared"] = shared[0](args[0][:2], ids)   # explicit ids win over the call's names
                seen["shared_ref"] = (args[0][:2], ids)

        handle = q.register_forward_pre_hook(hook)
        try:
            y_outer = wrapped(x, adapter_names=outer_names)
        finally:
            handle.remove()
    assert_close("outer call", y_outer, ref_outer, y_peft_outer)
    assert_close("nested inner call", seen["inner"], ref_inner, y_peft_inner)
    xs, ids = seen["shared_ref"]
    base = model.get_base_model()
    want = xs.double() @ q.base_layer.weight.double().t() + q.base_layer.bias.double()
    for i, name in enumerate(["r4", "r64"]):
        A, B, s = q.bank.adapter(name)
        want[i] += s * (xs[i].double() @ A.double().t()) @ B.double().t()
    assert base.q is q and ids.tolist() == [q.bank.index("r4"), q.bank.index("r64")]
    assert torch.allclose(seen["shared"].double(), want, atol=1e-5)


def test_threads_each_use_their_own_names():
    """Two threads run the same wrapped model at the same time with different names: each gets its own result."""
    import threading
    model = peft_model(torch.float32)
    wrapped = MultiAdapterModel(model, backend="torch")
    jobs = {"a": (["r8", "r1"] * 2, torch.randn(4, 2, 48)), "b": (["r16", "__base__", "r64", "r4"], torch.randn(4, 2, 48))}
    out, errors, barrier = {}, [], threading.Barrier(2)

    def run(key):
        names, x = jobs[key]
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(20):
                    out[key] = wrapped(x, adapter_names=names)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrapped.restore()
    with torch.no_grad():
        for key, (names, x) in jobs.items():
            assert_close(f"thread {key}", out[key], oracle64(model, x, names), model(x, adapter_names=names))


def test_exception_inside_forward_leaves_no_stale_names():
    from fastlora.nn.multi import current_adapter_call
    model = peft_model(torch.float32)
    wrapped = MultiAdapterModel(model, backend="torch")
    q, v = _layers(wrapped)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = v.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        wrapped(torch.randn(2, 3, 48), adapter_names=["r8", "r1"])
    handle.remove()
    assert current_adapter_call() is None
    with pytest.raises(ValueError, match="needs adapter_ids"):
        q(torch.randn(2, 3, 48))
    assert not any("adapter_ids" in vars(m) for m in (q, v))      # nothing is stored on the layers


def test_single_name_str_is_a_clear_type_error():
    """PEFT itself would split "r8" into characters (unknown adapters 'r', '8'); we refuse a str outright."""
    model = peft_model(torch.float32)
    wrapped = MultiAdapterModel(model, backend="torch")
    q, _ = _layers(wrapped)
    x = torch.randn(2, 3, 48)
    with pytest.raises(TypeError, match=r"single str 'r8'.*\['r8'\] \* batch_size"):
        wrapped(x, adapter_names="r8")
    with pytest.raises(TypeError, match="single str 'r8'"):
        q(x, "r8")
    with pytest.raises(TypeError, match="adapter names"):
        wrapped(x, adapter_names=["r8", 3])


def test_wrong_length_adapter_names_error_names_adapter_names_and_the_lengths():
    model = peft_model(torch.float32)
    wrapped = MultiAdapterModel(model, backend="torch")
    x = torch.randn(2, 3, 48)
    for names in (["r8"], ["r8", "r4", "r1"]):
        with pytest.raises(ValueError, match=rf"adapter_names must hold one adapter name per sequence: got "
                                             rf"{len(names)} name\(s\) for a batch of 2"):
            wrapped(x, adapter_names=names)
        with pytest.raises(ValueError, match=r"^adapter_names must hold"):
            model(x, adapter_names=names)              # PEFT's own mixed batch, routed to the banks while wrapped


# ---------------------------------------------------------------------------
# a full model wrapper: generate, attributes, PEFT's own mixed batches while wrapped
# ---------------------------------------------------------------------------

def tiny_llama(seed=0):
    """A random 2-layer Llama (nothing downloaded) with PEFT adapters "math" (r 4) and "code" (r 8) on q/v."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return with_adapters(transformers.LlamaForCausalLM(cfg), {
        "math": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "code": peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"])}).eval()


def test_generate_with_mixed_adapters_and_peft_methods_while_wrapped():
    import copy
    model = tiny_llama()
    names = ["math", "__base__", "code"]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids, adapter_names=names).logits
        base = model(ids, adapter_names=names).logits
        want = model.generate(input_ids=ids, adapter_names=names, **gen)
        want_beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, **gen)
        mm = MultiAdapterModel(model, backend="torch")
        assert_close("logits", mm(ids, adapter_names=names).logits, ref, base)
        assert torch.equal(mm.generate(input_ids=ids, adapter_names=names, **gen), want)
        assert torch.equal(mm.generate(input_ids=ids, adapter_names=names, num_beams=2, **gen), want_beams)
        # PEFT's own mixed-batch entry points run through the banks while wrapped
        assert torch.equal(model.generate(input_ids=ids, adapter_names=names, **gen), want)
        assert_close("PEFT forward while wrapped", model(ids, adapter_names=names).logits, ref, base)
        layers = [m for m in model.modules() if type(m).__name__ == "MultiLoraLinear"]
        assert len(layers) == 4
    # attributes fall through; methods needing PEFT's layers say so
    assert mm.config is model.config and mm.peft_config is model.peft_config
    with pytest.raises(AttributeError, match=r"restore\(\) first"):
        mm.merge_and_unload()
    with pytest.raises(AttributeError, match="no_such_thing"):
        mm.no_such_thing
    with pytest.raises(ValueError, match="unknown adapter"):
        model(ids, adapter_names=["math", "math", "zz"])
    assert mm.restore() is model and "_enable_peft_forward_hooks" not in vars(model.base_model)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, adapter_names=names, **gen), want)


def peft_dropout_model(dtype=torch.float32):
    """Tiny with adapters of per-adapter lora_dropout 0.3 / 0 / 0.1 (PEFT's nn.Dropout / nn.Identity)."""
    torch.manual_seed(0)
    model = with_adapters(Tiny().to(dtype), {
        name: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["q", "v"])
        for name, r, p in (("d3", 4, 0.3), ("d0", 8, 0.0), ("d1", 2, 0.1))})
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return model


def peft_by_adapter(model, x, names, dy, seed, backend):
    """PEFT (with fastlora's replayed dropout masks), one adapter at a time on the whole batch, each sequence
    taking its own adapter's rows: torch.manual_seed(seed) before each run, so every layer draws the same
    seed as the mixed-batch call. Loss Σ y·dy over those rows: the grads accumulate in PEFT's parameters,
    which is the mixed batch's gradient (a sum over sequences). Returns y."""
    from tests._replay import replay_dropout
    replay_dropout(model, op="multi", backend=backend)
    y = None
    for name in dict.fromkeys(names):
        rows = torch.tensor([n == name for n in names])[:, None, None]
        torch.manual_seed(seed)
        if name == "__base__":
            with model.disable_adapter():
                yk = model(x)
        else:
            model.base_model.set_adapter(name)
            yk = model(x)
        if yk.requires_grad:                       # "__base__": no adapter, nothing to train
            (yk * dy * rows).sum().backward()
        y = torch.where(rows, yk.detach(), 0 if y is None else y)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return y


def lora_grads(model):
    base = model.get_base_model()
    return {f"{mod}.{ab}.{name}": getattr(getattr(base, mod), ab)[name].weight.grad
            for mod in ("q", "v") for ab in ("lora_A", "lora_B") for name in getattr(base, mod).lora_A}


def bank_grads(wrapped):
    """The banks' per-adapter gradients (same keys as lora_grads)."""
    out = {}
    for mod in ("q", "v"):
        bank = getattr(wrapped.model.get_base_model(), mod).bank
        for name in bank.names:
            A, B, _ = bank.adapter(name)
            out[f"{mod}.lora_A.{name}"], out[f"{mod}.lora_B.{name}"] = A.grad, B.grad
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_adapter_dropout_matches_peft_adapter_by_adapter(backend):
    """PEFT's per-adapter lora_dropout is honoured in training: outputs and every adapter's gradients match
    PEFT run adapter by adapter with the same masks (float64 oracle, PEFT fp32 baseline)."""
    import copy
    model = peft_dropout_model()
    oracle_model, baseline_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    names = ["d3", "d0", "__base__", "d1", "d3"]
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(5, 3, 48, generator=g), torch.randn(5, 3, 56, generator=g)
    ref = peft_by_adapter(oracle_model, x.double(), names, dy.double(), seed=11, backend=backend)
    base = peft_by_adapter(baseline_model, x, names, dy, seed=11, backend=backend)
    wrapped = MultiAdapterModel(model, backend=backend).train()
    q = wrapped.model.get_base_model().q
    assert q.adapter_dropout == {"d3": 0.3, "d0": 0.0, "d1": 0.1}
    torch.manual_seed(11)
    y = wrapped(x, adapter_names=names)
    (y * dy).sum().backward()
    assert_close("y (train, dropout)", y, ref, base)
    got, want, bl = bank_grads(wrapped), lora_grads(oracle_model), lora_grads(baseline_model)
    for key in want:
        assert_close(key, got[key], want[key], bl[key])
    # the masks really bite: eval (no dropout) differs from train
    with torch.no_grad():
        assert not torch.allclose(wrapped.eval()(x, adapter_names=names), y)


# ---------------------------------------------------------------------------
# training many adapters in one batch trains PEFT's own adapters
# ---------------------------------------------------------------------------

def peft_layers(model):
    """PEFT's lora.Linear layers q, v (taken before wrapping: the wrapper swaps them out)."""
    return {mod: getattr(model.get_base_model(), mod) for mod in ("q", "v")}


def peft_weights(layers):
    return {f"{mod}.{ab}.{name}": getattr(layer, ab)[name].weight.detach().clone()
            for mod, layer in layers.items() for ab in ("lora_A", "lora_B") for name in layer.lora_A}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sgd_steps_train_peft_adapters(backend, tmp_path):
    """3 SGD steps through MultiAdapterModel on a mixed batch (with per-adapter dropout) = the same steps done
    adapter by adapter in PEFT (the mixed batch's gradient is the sum of the per-adapter ones). After
    sync_to_peft the PEFT model's Parameters hold the trained values (float64 oracle, PEFT fp32 baseline),
    save_pretrained writes them, and the restored PEFT model gives the trained outputs."""
    import copy
    from fastlora.integrations.checkpoint import read_peft_checkpoint
    model = peft_dropout_model()
    oracle_model, baseline_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    layers = peft_layers(model)
    before = peft_weights(layers)
    names = ["d3", "d0", "__base__", "d1", "d3"]
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(5, 3, 48, generator=g), torch.randn(5, 3, 56, generator=g)) for _ in range(3)]
    lr = 1e-3
    wrapped = MultiAdapterModel(model, backend=backend).train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == {
        f"model.base_model.model.{m}.bank.lora_{ab}_params.{name}" for m in ("q", "v") for ab in "AB"
        for name in ("d3", "d0", "d1")}
    for step, (x, dy) in enumerate(batches):
        opt.zero_grad()
        torch.manual_seed(100 + step)
        (wrapped(x, adapter_names=names) * dy).sum().backward()
        opt.step()
        for m, xx, dd in ((oracle_model, x.double(), dy.double()), (baseline_model, x, dy)):
            m.train()
            m.zero_grad()
            peft_by_adapter(m, xx, names, dd, seed=100 + step, backend=backend)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
    assert torch.equal(peft_weights(layers)["q.lora_A.d3"], before["q.lora_A.d3"])   # not synced yet: copies
    assert wrapped.sync_to_peft() == 6                                    # 3 adapters x 2 layers trained
    got = peft_weights(layers)
    want, base = peft_weights(peft_layers(oracle_model)), peft_weights(peft_layers(baseline_model))
    for key in want:
        assert (want[key] - before[key].double()).abs().max() > 1e-3, f"{key} did not train"
        assert_close(key, got[key], want[key], base[key])
    # save_pretrained (through the wrapper) writes the trained values
    wrapped.save_pretrained(tmp_path)
    for name in ("d3", "d0", "d1"):
        _, tensors = read_peft_checkpoint(tmp_path / name)
        for mod in ("q", "v"):
            for ab in ("lora_A", "lora_B"):
                assert torch.equal(tensors[f"base_model.model.{mod}.{ab}.weight"], got[f"{mod}.{ab}.{name}"])
    # the live and the restored PEFT model give the trained outputs
    x = batches[0][0]
    with torch.no_grad():
        wrapped.eval()
        oracle_model.eval()
        ref = oracle_model(x.double(), adapter_names=names)
        y_wrapped = wrapped(x, adapter_names=names)
        peft_model = wrapped.restore()
        y_peft = peft_model(x, adapter_names=names)
        assert_close("restored PEFT model", y_peft, ref, baseline_model.eval()(x, adapter_names=names))
        assert_close("wrapped model", y_wrapped, ref, y_peft)


def issue_recipe_model(seed=0):
    """get_peft_model(..., adapter_name="math"), then add_adapter("code"), add_adapter("chat") (chat on q only):
    PEFT trains math and leaves the two added adapters frozen. Random nonzero weights; math has dropout 0.1."""
    torch.manual_seed(seed)
    return with_adapters(Tiny(), {
        "math": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q", "v"]),
        "code": peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q", "v"]),
        "chat": peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q"])})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adamw_leaves_adapters_peft_froze_bitwise_unchanged(backend):
    """Five AdamW(weight_decay=0.1) steps over mm.parameters() on a mixed batch using all three adapters, then
    restore(): every tensor of the adapters PEFT froze is bitwise unchanged (no gradient is even accumulated for
    them), and the trained one equals PEFT's AdamW steps taken adapter by adapter with the same masks (float64
    oracle, PEFT fp32 baseline). (Before: 8 of 12 code and 12 of 28 chat tensors moved, by weight decay.)"""
    import copy
    model = issue_recipe_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{m}.lora_{ab}.math.weight" for m in "qv" for ab in "AB"}
    oracle_model, baseline_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    layers = peft_layers(model)
    before = peft_weights(layers)
    names = ["code", "math", "chat", "__base__", "math", "chat"]
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, 48, generator=g), torch.randn(6, 3, 56, generator=g)) for _ in range(5)]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    mm = MultiAdapterModel(model, backend=backend).train()
    opt = torch.optim.AdamW(mm.parameters(), **hyper)
    frozen = [p for n, p in mm.named_parameters() if ".code" in n or ".chat" in n]
    assert len(frozen) == 6 and not any(p.requires_grad for p in frozen)
    opts = [(m, torch.optim.AdamW([p for n, p in m.named_parameters() if n in trainable], **hyper))
            for m in (oracle_model, baseline_model)]
    for step, (x, dy) in enumerate(batches):
        opt.zero_grad()
        torch.manual_seed(100 + step)
        (mm(x, adapter_names=names) * dy).sum().backward()
        assert all(p.grad is None for p in frozen)
        opt.step()
        for m, o in opts:
            xx, dd = (x.double(), dy.double()) if m is oracle_model else (x, dy)
            m.train()
            m.zero_grad()
            peft_by_adapter(m, xx, names, dd, seed=100 + step, backend=backend)
            o.step()
    assert mm.sync_to_peft() == 2                                          # math on q and on v
    mm.restore()
    after = peft_weights(layers)
    want, base = peft_weights(peft_layers(oracle_model)), peft_weights(peft_layers(baseline_model))
    assert len(before) == 10
    for key in before:
        if key.endswith(".math"):
            assert (want[key] - before[key].double()).abs().max() > 1e-2, f"{key} did not train"
            assert_close(key, after[key], want[key], base[key])
        else:
            assert torch.equal(after[key], before[key]), f"{key}: PEFT froze it, it changed"


def test_sync_leaves_untrained_adapters_exact_and_refuses_foreign_ones():
    model = peft_model(torch.float32)
    layers = peft_layers(model)
    before = peft_weights(layers)
    wrapped = MultiAdapterModel(model, dtype=torch.bfloat16, backend="torch")
    assert wrapped.sync_to_peft() == 0                 # nothing trained: PEFT's fp32 values stay exact
    assert all(torch.equal(w, before[k]) for k, w in peft_weights(layers).items())
    q = wrapped.model.get_base_model().q
    q.bank.add("extra", torch.randn(2, 48), torch.randn(40, 2))
    with pytest.raises(ValueError, match="'extra'.*not in the PEFT layer"):
        wrapped.sync_to_peft()
    q.bank.remove("extra")
    with torch.no_grad():
        q.bank.lora_A.add_(1.0)                        # by hand: every adapter of q moves (the packed storage)
    # only r1 trains (PEFT froze the adapters added after it): it is written, the frozen ones are not, and said so
    with pytest.warns(UserWarning, match="not written back.*: 'r4' at 'q', 'r8' at 'q', 'r16' at 'q', 'r64' at 'q'$"):
        assert wrapped.sync_to_peft() == 1
    after = peft_weights(layers)
    assert {k for k in before if not torch.equal(after[k], before[k])} == {"q.lora_A.r1"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wrapper_compiles_fullgraph_and_trains(backend):
    """torch.compile(MultiAdapterModel, fullgraph=True) (aot_eager: Dynamo + AOTAutograd, cheap): the call is
    traced whole (while tracing it lives on a stack inside the traced frame, not in the ContextVar Dynamo cannot
    read); new adapter_ids reuse the same graph; outputs and every bank gradient equal the eager ones; a frozen
    adapter gets no gradient there either."""
    from torch._dynamo.utils import counters
    model = peft_model(torch.float32)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n and ".r4." not in n)                  # r4 frozen, in the batch
    x = torch.randn(4, 3, 48)
    mm = MultiAdapterModel(model, backend=backend).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(mm, fullgraph=True, backend="aot_eager")
    try:
        for ids in (torch.tensor([0, -1, 2, 4]), torch.tensor([3, 3, 1, -1]), torch.tensor([-1, 4, 4, 0])):
            got = []
            for fn in (compiled, mm):
                mm.zero_grad()
                y = fn(x, adapter_ids=ids)
                y.square().sum().backward()
                got.append([y.detach()] + [p.grad.clone() for p in mm.parameters() if p.requires_grad])
                assert all(p.grad is None for n, p in mm.named_parameters() if ".r4" in n)
            for c, e in zip(*got):
                torch.testing.assert_close(c, e, rtol=0, atol=0)
        assert counters["stats"]["unique_graphs"] == 1            # ids are data: no recompilation
    finally:
        torch._dynamo.reset()
        mm.restore()


def test_names_are_not_baked_into_a_compiled_model():
    """torch.compile of the wrapped PEFT model's inner model (dynamo; "eager" backend to keep it cheap): the layers
    read the names from the ContextVar at a graph break, so a second call with other names gets its own adapters.
    (Compiling the wrapper itself traces the whole call: test_wrapper_compiles_fullgraph_and_trains.)"""
    model = peft_model(torch.float32)
    n1, n2 = ["r8", "__base__", "r1", "r64"], ["r16"] * 4
    x = torch.randn(4, 3, 48)
    with torch.no_grad():
        refs = [(oracle64(model, x, n), model(x, adapter_names=n)) for n in (n1, n2)]
        wrapped = MultiAdapterModel(model, backend="torch")
        inner = model.base_model.model
        torch._dynamo.reset()
        model.base_model.model = torch.compile(inner, backend="eager")
        try:
            for _ in range(2):
                for n, (ref, base) in zip((n1, n2), refs):
                    assert_close(f"compiled {n}", wrapped(x, adapter_names=n), ref, base)
        finally:
            model.base_model.model = inner
            torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_with_the_calls_names(reentrant):
    """transformers' gradient checkpointing recomputes layers during backward, outside the call: the recompute
    must use the same adapter names (else it raises, or silently trains the wrong adapters). Gradients with
    checkpointing equal those without (same maths, recomputed), through the wrapper and through PEFT's own
    adapter_names path; restore() unwraps the checkpointing functions."""
    model = tiny_llama()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    names = ["math", "__base__", "code"]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    wrapped = MultiAdapterModel(model, backend="torch").train()

    def grads(call):
        wrapped.zero_grad()
        call().loss.backward()
        return {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad}

    plain = grads(lambda: wrapped(ids, adapter_names=names, labels=ids))
    assert all(g.abs().sum() > 0 for g in plain.values())
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for call in (lambda: wrapped(ids, adapter_names=names, labels=ids),
                 lambda: model(input_ids=ids, adapter_names=names, labels=ids)):
        ckpt = grads(call)
        for n in plain:
            torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
    wrapped.restore()
    assert not any(getattr(m.__dict__.get("_gradient_checkpointing_func"), "_fastlora_keeps_adapters", False)
                   for m in model.modules())
