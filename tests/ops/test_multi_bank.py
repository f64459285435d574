"""AdapterBank: packing without padding, add / remove / replace, scaling, dtype policy; bad input to the
multi-adapter op -> clear errors; a failed change leaves the bank exactly as it was."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fastlora
from fastlora.ops.bank import AdapterBank
from fastlora.nn.multi import MultiLoraLinear
from fastlora.ops.multi import multi_lora_linear

K, N = 12, 10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def filled(dtype=torch.float32):
    bank = AdapterBank(K, N, dtype=dtype, requires_grad=True)
    bank.add("a", rand(3, K, seed=1), rand(N, 3, seed=2), alpha=6.0)
    bank.add("b", rand(1, K, seed=3), rand(N, 1, seed=4), scaling=0.5)
    bank.add("c", rand(5, K, seed=5), rand(N, 5, seed=6), alpha=10.0, use_rslora=True)
    return bank


def snapshot(bank):
    return (bank.names, bank.ranks, bank.lora_A, bank.lora_B,
            {k: v.detach().clone() for k, v in bank.state_dict().items()})


def assert_same(bank, snap):
    names, ranks, A, B, state = snap
    assert bank.names == names and bank.ranks == ranks
    assert bank.lora_A is A and bank.lora_B is B            # not even re-wrapped
    now = bank.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def test_packed_layout_without_padding():
    bank = filled()
    assert bank.names == ["a", "b", "c"] and bank.ranks == [3, 1, 5] and bank.r_max == 5
    assert bank.offsets.tolist() == [0, 3, 4, 9]
    assert bank.lora_A.shape == (9, K) and bank.lora_B.shape == (N, 9)      # Σ r_k, not n·r_max
    assert torch.equal(bank.lora_A[4:9], rand(5, K, seed=5)) and torch.equal(bank.lora_B[:, 3:4], rand(N, 1, seed=4))
    assert bank.scalings.tolist() == pytest.approx([6.0 / 3, 0.5, 10.0 / math.sqrt(5)])
    A, B, s = bank.adapter("c")
    assert torch.equal(A, rand(5, K, seed=5)) and torch.equal(B, rand(N, 5, seed=6))
    assert bank.ids(["c", "__base__", None, "a"]).tolist() == [2, -1, -1, 0]


def test_remove_and_replace_repack():
    bank = filled()
    bank.remove("a")
    assert bank.names == ["b", "c"] and bank.offsets.tolist() == [0, 1, 6]
    assert torch.equal(bank.lora_A[1:6], rand(5, K, seed=5))
    assert bank.replace("b", rand(7, K, seed=8), rand(N, 7, seed=9), alpha=7.0) == 0     # rank 1 -> 7, same index
    assert bank.ranks == [7, 5] and bank.offsets.tolist() == [0, 7, 12] and bank.scalings[0].item() == 1.0
    assert all(p.requires_grad for p in bank.parameters()) and len(list(bank.parameters())) == 4   # policy kept
    # the op sees the new layout: each adapter equals the single-adapter op
    x, W = rand(6, K, seed=10), rand(N, K, seed=11)
    ids = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.int32)
    y = multi_lora_linear(x, W, None, bank, ids, backend="torch")
    for k, name in enumerate(bank.names):
        A, B, s = bank.adapter(name)
        y1 = fastlora.lora_linear(x, W, None, A.detach(), B.detach(), s, backend="torch")
        torch.testing.assert_close(y[ids == k], y1[ids == k], rtol=1e-5, atol=1e-5)


BAD_CHANGES = [
    ("add wrong in_features", lambda b: b.add("d", rand(2, K + 1), rand(N, 2)), ValueError, r"lora_A .* \(r, 12\)"),
    ("add rank mismatch", lambda b: b.add("d", rand(2, K), rand(N, 3)), ValueError, "rank mismatch"),
    ("add rank 0", lambda b: b.add("d", rand(0, K), rand(N, 0)), ValueError, "r >= 1"),
    ("add existing name", lambda b: b.add("b", rand(2, K), rand(N, 2)), ValueError, "already exists"),
    ("add reserved name", lambda b: b.add("__base__", rand(2, K), rand(N, 2)), ValueError, "name"),
    ("add scaling and alpha", lambda b: b.add("d", rand(2, K), rand(N, 2), scaling=1.0, alpha=2.0), ValueError,
     "not both"),
    ("add nan scaling", lambda b: b.add("d", rand(2, K), rand(N, 2), scaling=float("nan")), ValueError, "finite"),
    ("add int weights", lambda b: b.add("d", torch.ones(2, K, dtype=torch.int64), rand(N, 2)), TypeError,
     "floating"),
    ("add non-tensor", lambda b: b.add("d", [[1.0] * K], rand(N, 1)), TypeError, "lora_A must be a torch.Tensor"),
    ("add name with a dot", lambda b: b.add("d.1", rand(2, K), rand(N, 2)), ValueError, "without '.'"),
    ("add non-bool requires_grad", lambda b: b.add("d", rand(2, K), rand(N, 2), requires_grad=1), TypeError,
     "requires_grad must be a bool"),
    ("replace unknown", lambda b: b.replace("zz", rand(2, K), rand(N, 2)), KeyError, "unknown adapter name"),
    ("replace bad shape", lambda b: b.replace("c", rand(2, K), rand(N + 1, 2)), ValueError, "lora_B"),
    ("remove unknown", lambda b: b.remove("zz"), KeyError, "unknown adapter name"),
    ("set_scaling inf", lambda b: b.set_scaling("a", float("inf")), ValueError, "finite"),
]


@pytest.mark.parametrize("change", BAD_CHANGES, ids=[c[0] for c in BAD_CHANGES])
def test_failed_change_leaves_bank_unchanged(change):
    _, fn, exc, match = change
    bank = filled()
    snap = snapshot(bank)
    with pytest.raises(exc, match=match):
        fn(bank)
    assert_same(bank, snap)


def test_dtype_policy():
    bank = AdapterBank(K, N, dtype=torch.bfloat16)
    bank.add("a", rand(2, K), rand(N, 2))                                               # fp32 in, stored bf16
    assert bank.lora_A.dtype == bank.lora_B.dtype == torch.bfloat16 and bank.scalings.dtype == torch.float32
    x16 = rand(4, K).half()
    with pytest.raises(TypeError, match="lora_A and lora_B must share one dtype"):       # bf16 adapters, fp16 base
        multi_lora_linear(x16, rand(N, K).half(), None, bank, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype must be"):
        AdapterBank(K, N, dtype=torch.float64)


def bad_call(kind):
    bank = filled()
    x, W = rand(2, 3, K), rand(N, K)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    layer = MultiLoraLinear(torch.nn.Linear(K, N), bank)
    return {
        "id too large": lambda: multi_lora_linear(x, W, None, bank, ids + 3),
        "id below -1": lambda: multi_lora_linear(x, W, None, bank, ids - 2),
        "wrong length": lambda: multi_lora_linear(x, W, None, bank, torch.zeros(5, dtype=torch.int32)),
        "float ids": lambda: multi_lora_linear(x, W, None, bank, ids.float()),
        "ids on another device": lambda: multi_lora_linear(x, W, None, bank, ids.to("meta")),
        "unknown name": lambda: layer(x, ["a", "nope"]),
        "bank for another layer": lambda: MultiLoraLinear(torch.nn.Linear(K + 1, N), bank),
        "not a bank": lambda: multi_lora_linear(x, W, None, {"a": 1}, ids),
        "bad regime": lambda: multi_lora_linear(x, W, None, bank, ids, regime="fast"),
        "bad dropout": lambda: multi_lora_linear(x, W, None, bank, ids, dropout_p=1.0),
        "no ids": lambda: layer(x),
        "one name as a str": lambda: layer(x, "a"),
        "per-adapter p of wrong length": lambda: multi_lora_linear(x, W, None, bank, ids, dropout_p=[0.1, 0.2]),
        "per-adapter p out of range": lambda: multi_lora_linear(x, W, None, bank, ids, dropout_p=[0.1, 1.0, 0.0]),
        "bad p in a mapping": lambda: MultiLoraLinear(torch.nn.Linear(K, N), bank, dropout_p={"a": -0.1}),
    }[kind]


BAD_INPUT = [("id too large", ValueError, r"adapter_ids must be in \[-1, 3\)"),
             ("id below -1", ValueError, r"adapter_ids must be in \[-1, 3\)"),
             ("wrong length", ValueError, r"adapter_ids must have shape \(2, 3\) .* or \(2,\)"),
             ("float ids", TypeError, "adapter_ids must be int32 or int64"),
             ("ids on another device", ValueError, "adapter_ids must be on x's device"),
             ("unknown name", KeyError, "unknown adapter name 'nope'"),
             ("bank for another layer", ValueError, "in_features=13"),
             ("not a bank", TypeError, "bank must be a fastlora AdapterBank"),
             ("bad regime", ValueError, "regime must be one of"),
             ("bad dropout", ValueError, "dropout_p"),
             ("no ids", ValueError, "needs adapter_ids"),
             ("one name as a str", TypeError, r"single str 'a'"),
             ("per-adapter p of wrong length", ValueError, "sequence of 3 such floats"),
             ("per-adapter p out of range", ValueError, r"floats in \[0, 1\) \(one per adapter\), got 1.0"),
             ("bad p in a mapping", ValueError, r"dropout_p\['a'\] must be a float in \[0, 1\)")]


@pytest.mark.parametrize("kind,exc,match", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input(kind, exc, match):
    with pytest.raises(exc, match=match):
        bad_call(kind)()


def test_empty_bank_is_the_base_layer():
    bank = AdapterBank(K, N)
    x, W, b = rand(5, K), rand(N, K), rand(N)
    y = multi_lora_linear(x, W, b, bank, torch.full((5,), -1, dtype=torch.int32))
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))


# ---------------------------------------------------------------------------
# what trains: each adapter's A, B are Parameters viewing the packed buffers, each with its own requires_grad
# ---------------------------------------------------------------------------

def flags(bank):
    return {n: tuple(p.requires_grad for p in bank.adapter(n)[:2]) for n in bank.names}


def assert_attached(bank):
    """Every adapter Parameter is a view of its block of the packed buffers (what the kernels read), and an
    in-place change of it is what the packed buffers hold."""
    off = bank.offsets.tolist()
    for k, name in enumerate(bank.names):
        A, B, _ = bank.adapter(name)
        for p, view in ((A, bank.lora_A[off[k]:off[k + 1]]), (B, bank.lora_B[:, off[k]:off[k + 1]])):
            assert (p.data_ptr(), p.shape, p.stride()) == (view.data_ptr(), view.shape, view.stride()), name
    A = bank.adapter(bank.names[-1])[0]
    with torch.no_grad():
        old = A.clone()
        A.fill_(7.0)
        assert (bank.lora_A[off[-2]:] == 7.0).all()
        A.copy_(old)


def test_requires_grad_per_adapter():
    bank = filled()                                                         # requires_grad=True
    assert bank.requires_grad_(False, adapter="b") is bank
    assert flags(bank) == {"a": (True, True), "b": (False, False), "c": (True, True)}
    assert "frozen=['b']" in repr(bank)
    with pytest.raises(KeyError, match="unknown adapter name 'zz'"):
        bank.requires_grad_(False, adapter=["a", "zz"])
    with pytest.raises(TypeError, match=r"requires_grad must be a bool, got 'a'.*adapter=name"):
        bank.requires_grad_("a")                                           # a name where the flag goes
    with pytest.raises(TypeError, match="adapter must be an adapter name or a sequence"):
        bank.requires_grad_(False, adapter=3)
    assert flags(bank) == {"a": (True, True), "b": (False, False), "c": (True, True)}      # nothing changed
    bank.add("d", rand(2, K), rand(N, 2), requires_grad=False)
    bank.requires_grad_(True, adapter=["b"])
    bank.replace("a", rand(4, K), rand(N, 4))                              # a replaced adapter keeps its flags
    assert flags(bank) == {"a": (True, True), "b": (True, True), "c": (True, True), "d": (False, False)}
    bank.requires_grad_(False)                                             # every adapter, and those added later
    bank.add("e", rand(1, K), rand(N, 1))
    assert set(flags(bank).values()) == {(False, False)}


def test_changes_keep_the_other_adapters_parameters():
    """add / remove / replace repack the buffers; the adapters they keep keep their Parameter objects (an
    optimizer over them keeps working), re-pointed at the new buffers; state_dict holds one entry per adapter."""
    bank = filled()
    A_a, B_c = bank.adapter("a")[0], bank.adapter("c")[1]
    values = {n: [t.detach().clone() for t in bank.adapter(n)[:2]] for n in ("a", "c")}
    bank.add("d", rand(2, K, seed=7), rand(N, 2, seed=8))
    bank.remove("b")
    bank.replace("d", rand(6, K, seed=9), rand(N, 6, seed=10))
    assert bank.adapter("a")[0] is A_a and bank.adapter("c")[1] is B_c
    for n in ("a", "c"):
        assert all(torch.equal(p, v) for p, v in zip(bank.adapter(n)[:2], values[n]))
    assert_attached(bank)
    assert set(bank.state_dict()) == {f"lora_{ab}_params.{n}" for ab in "AB" for n in ("a", "c", "d")} | {
        "offsets", "scalings"}


@pytest.mark.parametrize("how", ["to", "deepcopy", "pickle", "load_state_dict", "load_state_dict_assign"])
def test_parameters_stay_views_of_the_packed_buffers(how):
    """Module.to(), deepcopy, pickling and load_state_dict (assign=True too) give Parameters storage of their
    own; the bank puts them back on the packed buffers (values and requires_grad kept)."""
    bank = filled().requires_grad_(False, adapter="b")
    want = {n: [t.detach().clone() for t in bank.adapter(n)[:2]] for n in bank.names}
    if how == "to":
        out = bank.to(torch.bfloat16)
        want = {n: [t.bfloat16() for t in ts] for n, ts in want.items()}
    elif how == "deepcopy":
        out = copy.deepcopy(bank)
    elif how == "pickle":
        buf = io.BytesIO()
        torch.save(bank, buf)
        buf.seek(0)
        out = torch.load(buf, weights_only=False)
    else:
        out = filled().requires_grad_(False, adapter="b")
        with torch.no_grad():
            for p in out.parameters():
                p.zero_()
        out.load_state_dict(bank.state_dict(), assign=how.endswith("assign"))
    assert_attached(out)
    assert flags(out) == {"a": (True, True), "b": (False, False), "c": (True, True)}
    for n, ts in want.items():
        assert all(torch.equal(p, v) for p, v in zip(out.adapter(n)[:2], ts)), n
    if how != "to":
        assert out.lora_A.data_ptr() != bank.lora_A.data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_adapter_gets_no_gradient_and_stays_bitwise_under_adamw(backend):
    """Adapter "b" frozen: the op gives "a" and "c" exactly the gradients an all-trainable bank gives them and
    "b" none at all; AdamW with weight decay over bank.parameters() leaves "b" bitwise unchanged and moves "a",
    "c" in the packed buffers the kernels read (no copy)."""
    bank, ref = filled().requires_grad_(False, adapter="b"), filled()
    x, W = rand(8, K, seed=10), rand(N, K, seed=11)
    ids = torch.tensor([0, 1, 2, 1, -1, 0, 1, 2], dtype=torch.int32)
    for bk in (bank, ref):
        multi_lora_linear(x, W, None, bk, ids, backend=backend).square().sum().backward()
    for name in ("a", "c"):
        for p, q in zip(bank.adapter(name)[:2], ref.adapter(name)[:2]):
            assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert all(p.grad is None for p in bank.adapter("b")[:2])
    packed = bank.lora_A.clone(), bank.lora_B.clone()
    torch.optim.AdamW(bank.parameters(), lr=0.1, weight_decay=0.1).step()
    off = bank.offsets.tolist()
    for k, name in enumerate(bank.names):
        moved = (not torch.equal(bank.lora_A[off[k]:off[k + 1]], packed[0][off[k]:off[k + 1]]),
                 not torch.equal(bank.lora_B[:, off[k]:off[k + 1]], packed[1][:, off[k]:off[k + 1]]))
        assert moved == ((False, False) if name == "b" else (True, True)), name


def test_no_gradient_computed_for_frozen_tensors(monkeypatch):
    """What is frozen is not even computed: a bank with no trainable adapter asks the backward for dx only; with
    only one adapter's A trainable, for dx and dA (the packed dA, cut into that adapter's block), not dB."""
    import fastlora.ops.multi as fm
    seen, real = [], fm._backward

    def spy(*args):
        seen.append(args[14:17])                                           # needs_dx, needs_dA, needs_dB
        return real(*args)

    monkeypatch.setattr(fm, "_backward", spy)
    bank = filled().requires_grad_(False)
    x, W = rand(5, K, seed=10).requires_grad_(), rand(N, K, seed=11)
    ids = torch.tensor([0, 1, 2, -1, 0], dtype=torch.int32)
    multi_lora_linear(x, W, None, bank, ids, backend="torch").sum().backward()
    bank.adapter("c")[0].requires_grad_(True)
    multi_lora_linear(x, W, None, bank, ids, backend="torch").sum().backward()
    assert seen == [(True, False, False), (True, True, False)]
    assert [n for n, p in bank.named_parameters() if p.grad is not None] == ["lora_A_params.c"]


def test_a_parameter_replaced_behind_the_banks_back_is_an_error():
    """torch.func.functional_call swaps a Parameter for another tensor, which the kernels (reading the packed buffer)
    would never see: in training that is a clear error, not a silently ignored substitution."""
    layer = MultiLoraLinear(torch.nn.Linear(K, N), filled())
    x, ids = rand(4, K), torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="adapter 'b': its lora_B Parameter is not a view of the bank's packed"):
        torch.func.functional_call(layer, {"bank.lora_B_params.b": rand(N, 1, seed=9)}, (x, ids))
    layer(x, ids).sum().backward()                                         # the bank itself is fine
