"""The multi-adapter batch plan (fastlora.ops.multi_plan): built once per model forward, shared by every layer,
one shrink and one expand launch per layer whatever the adapters' dropout, clear errors for plans that do
not fit, refilled in place for CUDA graphs, traced whole by torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastlora
import fastlora.kernels.multi_lora as ml
from fastlora.ops.bank import AdapterBank
from fastlora.nn.multi import MultiLoraLinear
from fastlora.ops.multi import multi_lora_linear
from fastlora.ops.multi_plan import TILE_M, BatchPlan, n_tiles, plan_batch
from tests.ops.test_multi_parity import make_bank, packed_grads, setup


def _bank(n, K=8, N=6, ranks=None):
    return make_bank(K, N, ranks or tuple(1 + (i % 5) for i in range(n)))


def _check_covers(plan, ids, regime):
    """Every token in exactly one tile, each tile one adapter (−1: base-only tokens), segments sorted by adapter."""
    M, n = ids.numel(), plan.n
    assert plan.T == n_tiles(M, n, regime) and plan.data.numel() == 3 * M + 3 * plan.T + n + 1
    assert torch.equal(plan.ids, ids)
    seen = []
    for k, lo, hi in zip(plan.tile_adapter.tolist(), plan.tile_lo.tolist(), plan.tile_hi.tolist()):
        assert 0 <= hi - lo <= (1 if regime == "decode" else TILE_M)
        rows = plan.rows[lo:hi].long()
        assert (ids[rows] == k).all(), (k, ids[rows])
        seen += rows.tolist()
    assert sorted(seen) == list(range(M))
    b = plan.bounds.tolist()
    assert b[0] == int((ids < 0).sum()) and b[-1] == M
    for k in range(n):
        seg = plan.sorted_rows[b[k]:b[k + 1]].long()
        assert (ids[seg] == k).all() and seg.tolist() == sorted(seg.tolist())     # stable: token order kept


@pytest.mark.parametrize("regime", ["decode", "grouped"])
@pytest.mark.parametrize("n,M", [(5, 37), (16, 16), (3, 64), (4, 1), (7, 30), (2, 100), (3, 0)])
def test_plan_covers_every_token_once(n, M, regime):
    g = torch.Generator().manual_seed(n * 100 + M)
    ids = torch.randint(-1, n, (M,), generator=g, dtype=torch.int32)
    ids[: M // 3] = 2 % n                                   # one adapter with many tokens (several full tiles)
    plan = plan_batch(_bank(n), ids, torch.empty(M, 8), regime=regime)
    assert plan.regime == regime
    _check_covers(plan, ids, regime)


def test_regime_is_chosen_by_shape():
    bank = _bank(8)
    assert plan_batch(bank, torch.zeros(8, dtype=torch.int32), torch.empty(8, 8)).regime == "decode"
    assert plan_batch(bank, torch.zeros(64, dtype=torch.int32), torch.empty(64, 8)).regime == "grouped"
    with pytest.raises(ValueError, match="regime must be one of"):
        plan_batch(bank, torch.zeros(8, dtype=torch.int32), torch.empty(8, 8), regime="fast")


def test_update_refills_the_same_tensor():
    bank = _bank(4)
    x = torch.empty(3, 5, 8)
    plan = plan_batch(bank, torch.tensor([0, 1, -1]), x, regime="grouped")
    data = plan.data
    plan.host_runs()
    new = torch.tensor([3, 3, 2])
    assert plan.update_(new) is plan and plan.data is data and plan._host == {}
    fresh = plan_batch(bank, new, x, regime="grouped")
    assert torch.equal(plan.data, fresh.data)
    _check_covers(plan, new[:, None].expand(3, 5).reshape(-1).to(torch.int32), "grouped")


def test_names_and_per_sequence_ids_give_the_same_plan():
    bank = _bank(3)
    x = torch.empty(3, 4, 8)
    by_name = plan_batch(bank, [bank.names[2], None, bank.names[0]], x)
    by_id = plan_batch(bank, torch.tensor([2, -1, 0]), x)
    assert torch.equal(by_name.data, by_id.data) and by_name.names == tuple(bank.names)
    with pytest.raises(KeyError, match="unknown adapter name"):
        plan_batch(bank, ["nope", None, None], x)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_plan_gives_what_ids_give_forward_and_backward(backend):
    x, W, b, bank = setup(24, 20, (1, 8, 16), torch.float32, torch.float32, (2, 9), requires_grad=True)
    ids = torch.tensor([[2, -1, 0, 0, 1, 2, 2, -1, 0], [1, 1, 1, 0, -1, 2, 0, 1, 2]], dtype=torch.int32)
    dy = torch.randn(2, 9, 20)
    out = []
    for kw in (dict(adapter_ids=ids), dict(plan=plan_batch(bank, ids, x))):
        xg = x.clone().requires_grad_()
        bank.zero_grad()
        y = multi_lora_linear(xg, W, b, bank, dropout_p=[0.1, 0.0, 0.3], seed=4, backend=backend, **kw)
        y.backward(dy)
        out.append((y.detach(), xg.grad, *packed_grads(bank)))
    for a, c in zip(*out):
        assert torch.equal(a, c)


def _bad_plans():
    bank = _bank(3)
    other = AdapterBank(8, 6)
    for name in reversed(bank.names):          # same adapters, another order
        A, B, s = bank.adapter(name)
        other.add(name, A, B, scaling=s)
    x = torch.randn(4, 8)
    ok = plan_batch(bank, torch.tensor([0, 1, 2, -1]), x)
    return bank, x, {
        "tokens": (lambda: multi_lora_linear(x[:3], torch.randn(6, 8), None, bank, plan=ok),
                   ValueError, r"plan was built for tokens of shape \(4,\), x has shape \(3, 8\)"),
        "bank order": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, other, plan=ok),
                       ValueError, "plan was built for a bank holding"),
        "bank size": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, _bank(2), plan=ok),
                      ValueError, "plan was built for a bank holding"),
        "device": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, bank,
                                             plan=BatchPlan(ok.data.to("meta"), (4,), 3, ok.regime)),
                   ValueError, "plan is on meta, x on cpu"),
        "type": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, bank, plan=ok.data),
                 TypeError, "plan must be a fastlora BatchPlan"),
        "both": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, bank, torch.zeros(4, dtype=torch.int32),
                                           plan=ok), ValueError, "exactly one of adapter_ids= .* and plan="),
        "neither": (lambda: multi_lora_linear(x, torch.randn(6, 8), None, bank),
                    ValueError, "exactly one of adapter_ids= .* and plan="),
        "ids range": (lambda: plan_batch(bank, torch.tensor([0, 1, 3, -1]), x),
                      ValueError, r"adapter_ids must be in \[-1, 3\)"),
        "update shape": (lambda: ok.update_(torch.tensor([0, 1])), ValueError, "adapter_ids must have shape"),
    }


@pytest.mark.parametrize("kind", list(_bad_plans()[2]))
def test_bad_plan_is_a_clear_error(kind):
    _, _, cases = _bad_plans()
    fn, exc, match = cases[kind]
    with pytest.raises(exc, match=match):
        fn()


class _Launches:
    """Counts the multi-adapter kernel launches and the base-size GEMMs (addmm_ onto y / dx) of a call."""

    def __init__(self, monkeypatch):
        self.calls = []
        for k in ("_shrink_kernel", "_expand_kernel", "_grad_kernel"):
            kern = getattr(ml, k)
            outer = self

            class Launch:
                def __getitem__(self, grid, _k=kern, _name=k):
                    outer.calls.append(_name.strip("_").replace("_kernel", ""))
                    return _k[grid]
            monkeypatch.setattr(ml, k, Launch())


def test_one_shrink_and_one_expand_per_layer_whatever_the_dropout(monkeypatch):
    """Three adapters with three different p (PEFT allows one lora_dropout per adapter): still one launch per
    stage, forward and backward (the kernels read p_k from a table)."""
    x, W, b, bank = setup(24, 20, (1, 8, 16), torch.float32, torch.float32, (40,), requires_grad=True)
    ids = torch.randint(-1, 3, (40,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    launches = _Launches(monkeypatch)
    y = multi_lora_linear(x.requires_grad_(), W, b, bank, ids, [0.1, 0.2, 0.0], seed=3, backend="triton")
    assert launches.calls == ["shrink", "expand"]
    launches.calls.clear()
    y.sum().backward()
    assert sorted(launches.calls) == ["expand", "grad", "grad", "shrink"]


def test_a_model_call_builds_one_plan_per_bank_layout(monkeypatch):
    """MultiAdapterModel over a 2-layer Llama (4 LoRA layers, all holding "math" and "code"): one plan per call;
    over the tests' two-layer model whose adapter "r64" targets only q: two layouts, two plans."""
    import fastlora.nn.multi as fm                  # where a model call builds its plans
    from tests.integrations.test_multi_peft import peft_model, tiny_llama
    built = []
    orig = fm.plan_batch
    monkeypatch.setattr(fm, "plan_batch", lambda *a, **k: built.append(a[0].names) or orig(*a, **k))
    with torch.no_grad():
        mm = fastlora.MultiAdapterModel(tiny_llama(), backend="torch")
        ids = torch.randint(0, 64, (3, 5))
        mm(ids, adapter_names=["math", "__base__", "code"])
        assert built == [["math", "code"]]
        built.clear()
        mm2 = fastlora.MultiAdapterModel(peft_model(torch.float32), backend="torch")
        mm2(torch.randn(4, 3, 48), adapter_names=["r8", "r64", "__base__", "r1"])
        assert len(built) == 2 and len({tuple(n) for n in built}) == 2


def test_model_adapter_ids_match_names():
    """adapter_ids= (an int tensor indexing mm.adapter_names: the capture-friendly form) = adapter_names=."""
    from tests.integrations.test_multi_peft import peft_model
    model = peft_model(torch.float32)
    names = ["r8", "__base__", "r1", "r64"]
    x = torch.randn(4, 3, 48)
    with torch.no_grad():
        mm = fastlora.MultiAdapterModel(model, backend="torch")
        ids = torch.tensor([mm.adapter_names.index(n) if n != "__base__" else -1 for n in names])
        assert torch.equal(mm(x, adapter_ids=ids), mm(x, adapter_names=names))
        with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 5\)"):
            mm(x, adapter_ids=torch.tensor([0, 1, 2, 5]))
        with pytest.raises(ValueError, match="exactly one of adapter_names="):
            mm(x, adapter_names=names, adapter_ids=ids)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_with_a_plan_compiles_fullgraph(backend):
    """The plan is an argument (its int32 tensor enters the custom op): the layer traces without graph breaks
    and gives the eager result, forward and gradients."""
    K, N = 24, 20
    bank = make_bank(K, N, (1, 8, 16), requires_grad=True)
    layer = MultiLoraLinear(torch.nn.Linear(K, N), bank, dropout_p={"ad0": 0.2, "ad2": 0.1}, backend=backend)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(10, K)
    plan = plan_batch(bank, torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 1, 0], dtype=torch.int32), x)

    def step(fn):
        bank.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg, plan)
        y.backward(torch.ones_like(y))
        return (y.detach(), xg.grad, *packed_grads(bank))

    torch._dynamo.reset()
    try:
        compiled = step(torch.compile(lambda x, p: layer(x, plan=p, seed=7), fullgraph=True))
    finally:
        torch._dynamo.reset()
    eager = step(lambda x, p: layer(x, plan=p, seed=7))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
