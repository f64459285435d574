"""Multi-adapter LoRA: outputs and every gradient vs a float64 oracle and a same-dtype baseline.

Oracle (float64): for each adapter k, fastlora.lora_linear_reference on the whole batch with the op's dropout
mask for its seed (the single-adapter op's mask of x seen as (M, K) on that backend), then token m takes
the row of its own adapter (−1: x·Wᵀ + bias). Autograd through it gives dx, dA_k, dB_k independently of
our backward.
Baseline (same dtype): the same selection done PEFT's way in the test's dtype (x cast to the adapter
dtype, LoRA term rounded to x's dtype, added to the rounded base output).
Tolerance idiom (tests/_tolerance.py): error vs float64 <= 2 x baseline's error + a few ulps of the
output's scale. Runs the Triton kernels in the interpreter (conftest sets TRITON_INTERPRET=1) for
backend="triton", and the pure-torch path for backend="torch".
"""
from __future__ import annotations

import pytest
import torch

from fastlora.ops.bank import AdapterBank
from fastlora.core.backend import select_backend
from fastlora.nn.multi import MultiLoraLinear
from fastlora.ops.multi import multi_lora_linear
from fastlora.ops.lora import lora_linear_reference
from tests._replay import mask_of
from tests._tolerance import assert_close

MIXED = (1, 4, 8, 16, 64)


def make_bank(K, N, ranks, dtype=torch.float32, seed=0, requires_grad=False):
    """Adapters with O(1) outputs (A ~ N(0, 1/K), B ~ N(0, 1/r)); alternate plain and rsLoRA scaling."""
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank(K, N, dtype=dtype, requires_grad=requires_grad)
    for i, r in enumerate(ranks):
        bank.add(f"ad{i}", torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g) / r ** 0.5,
                 alpha=float(2 * r if i % 2 else 3), use_rslora=i % 2 == 0)
    return bank


def split(bank, dtype=None, requires_grad=False):
    """[(A_k, B_k, s_k)] as independent leaf tensors (optionally cast)."""
    out = []
    for name in bank.names:
        A, B, s = bank.adapter(name)
        A, B = A.detach().clone(), B.detach().clone()
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        out.append((A.requires_grad_(requires_grad), B.requires_grad_(requires_grad), s))
    return out


def packed_grads(bank):
    """(dA (R_tot, K), dB (N, R_tot)): the bank's per-adapter gradients laid out as its packed tensors."""
    grads = [(A.grad, B.grad) for A, B, _ in map(bank.adapter, bank.names)]
    return torch.cat([a for a, _ in grads]), torch.cat([b for _, b in grads], 1)


def oracle(x, W, b, adapters, ids_tok, p, keep):
    """float64 per-adapter lora_linear_reference, each token taking its adapter's row; ``keep``: the (M, K)
    dropout mask (None without dropout)."""
    N, K = W.shape
    y = (x.reshape(-1, K) @ W.t() + b)
    for k, (A, B, s) in enumerate(adapters):
        yk = lora_linear_reference(x, W, b, A, B, s, p, keep=keep).reshape(-1, N)
        y = torch.where((ids_tok == k)[:, None], yk, y)
    return y.reshape(*x.shape[:-1], N)


def baseline(x, W, b, adapters, ids_tok, p, keep):
    """PEFT's arithmetic in x's dtype: base rounded, LoRA in the adapter dtype, rounded, added."""
    N, K = W.shape
    x2 = x.reshape(-1, K)
    y = x2 @ W.t() + b
    for k, (A, B, s) in enumerate(adapters):
        d = x2.to(A.dtype)
        if p > 0:
            d = d * keep / (1 - p)
        lk = (s * ((d @ A.t()) @ B.t())).to(x.dtype)
        y = torch.where((ids_tok == k)[:, None], y + lk, y)
    return y.reshape(*x.shape[:-1], N)


def abs_scales(x, W, b, adapters, ids_tok, p, keep, dy, weight_grad=False):
    """The oracle's gradients on |inputs| (and |dy|, |s|): Σ|terms| of every nested sum, the scale that
    rounding errors are relative to (tests/_tolerance.py). dA_k = Σ_m dS[m]·x[m] nests the sum over N in
    dS = s·dY·B_k, so max|dA| alone understates it by ~sqrt(N) (an H200 run showed fp32 at K = N ≈ 1000
    exceeding a max|result| atol by 1.6x with a correct kernel). Returns (dx, dbias, [(dA_k, dB_k)]), and dW
    (W's layout) last with ``weight_grad``."""
    ab = lambda t: t.detach().double().abs().requires_grad_()  # noqa: E731
    xa, ba, Wa = ab(x), ab(b), ab(W)
    ada = [(ab(A), ab(B), abs(s)) for A, B, s in adapters]
    oracle(xa, Wa, ba, ada, ids_tok, p, keep).backward(dy.double().abs())
    return (xa.grad, ba.grad, [(A.grad, B.grad) for A, B, _ in ada]) + ((Wa.grad,) if weight_grad else ())


def setup(K, N, ranks, xdt, adt, lead, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, K, generator=g).to(xdt)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(xdt)
    b = (torch.randn(N, generator=g) * 0.1).to(xdt)
    bank = make_bank(K, N, ranks, adt, seed, requires_grad)
    return x, W, b, bank


def tok_ids(ids, x):
    return ids.reshape(-1) if ids.shape == x.shape[:-1] else ids[:, None].expand(x.shape[:2]).reshape(-1)


FWD_CASES = [
    # id,                      xdt,            adt,            ranks,       lead,    ids kind,   regime,   backend
    ("fp32-mixed-unsorted",    torch.float32,  torch.float32,  MIXED,       (37,),   "random",   "auto",    "triton"),
    ("fp32-mixed-decode",      torch.float32,  torch.float32,  MIXED,       (37,),   "random",   "decode",  "triton"),
    ("fp16-sorted-grouped",    torch.float16,  torch.float16,  MIXED,       (40,),   "sorted",   "grouped", "triton"),
    ("bf16-fp32ad-decode",     torch.bfloat16, torch.float32,  MIXED,       (24,),   "random",   "decode",  "triton"),
    ("bf16-16ad-some-absent",  torch.bfloat16, torch.bfloat16, MIXED * 3 + (4,), (64,), "subset", "grouped", "triton"),
    ("fp32-1tok-per-adapter",  torch.float32,  torch.float32,  MIXED * 3 + (4,), (16,), "perm",   "auto",    "triton"),
    ("fp16-all-base",          torch.float16,  torch.float16,  MIXED,       (20,),   "none",     "grouped", "triton"),
    ("fp32-per-sequence",      torch.float32,  torch.float32,  (8, 1, 16),  (4, 6),  "per-seq",  "auto",    "triton"),
    ("fp32-one-adapter",       torch.float32,  torch.float32,  (5,),        (30,),   "random",   "auto",    "triton"),
    ("torch-bf16-fp32ad",      torch.bfloat16, torch.float32,  MIXED,       (37,),   "random",   "auto",    "torch"),
    ("torch-fp16-16ad",        torch.float16,  torch.float16,  MIXED * 3 + (4,), (64,), "subset", "auto",    "torch"),
]


def make_ids(kind, n, lead, seed=3):
    g = torch.Generator().manual_seed(seed)
    M = lead[0] if kind == "per-seq" else int(torch.tensor(lead).prod())
    if kind == "random":
        ids = torch.randint(-1, n, (M,), generator=g)
    elif kind == "sorted":
        ids = torch.randint(-1, n, (M,), generator=g).sort().values
    elif kind == "subset":        # adapters 1, 3, 5 … never appear
        ids = torch.tensor([-1] + list(range(0, n, 2)))[torch.randint(0, (n + 1) // 2 + 1, (M,), generator=g)]
    elif kind == "perm":          # every adapter exactly once
        ids = torch.randperm(n, generator=g)[:M]
    elif kind == "none":
        ids = torch.full((M,), -1)
    else:                         # per sequence
        ids = torch.randint(-1, n, (M,), generator=g)
    return ids.to(torch.int32)


def check_forward(case, K=45, N=70, device="cpu", *, fan_in_fan_out=False):
    """One FWD_CASES row at (K, N) on ``device``: y vs the float64 oracle, PEFT's arithmetic as the baseline.
    fan_in_fan_out: the base layer is a GPT-2 Conv1D (weight stored (K, N))."""
    from transformers.pytorch_utils import Conv1D
    _, xdt, adt, ranks, lead, kind, regime, backend = case
    x, W, b, bank = setup(K, N, ranks, xdt, adt, lead)
    x, W, b, bank = x.to(device), W.to(device), b.to(device), bank.to(device)
    ids = make_ids(kind, len(bank), lead).to(device)
    base = Conv1D(N, K) if fan_in_fan_out else torch.nn.Linear(K, N)
    layer = MultiLoraLinear(base.to(device, xdt), bank, regime=regime, backend=backend)
    assert layer.fan_in_fan_out == fan_in_fan_out
    with torch.no_grad():
        layer.base_layer.weight.copy_(W.t() if fan_in_fan_out else W)
        layer.base_layer.bias.copy_(b)
        y = layer(x, ids)
    it = tok_ids(ids, x)
    ref = oracle(x.double(), W.double(), b.double(), split(bank, torch.float64), it, 0.0, None)
    base = baseline(x, W, b, split(bank), it, 0.0, 0)
    assert y.dtype == xdt and y.shape == (*lead[:len(x.shape) - 1], N)
    assert_close("y", y, ref, base)
    if kind == "none":            # base model only: exactly torch's linear
        assert torch.equal(y, torch.nn.functional.linear(x, W, b))


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_parity(case):
    check_forward(case)


GRAD_CASES = [
    # id,                  xdt,            adt,            lead,    p,    regime
    ("fp32-drop-grouped",  torch.float32,  torch.float32,  (4, 9),  0.25, "grouped"),
    ("fp32-decode",        torch.float32,  torch.float32,  (21,),   0.0,  "decode"),
    ("bf16-fp32ad-drop",   torch.bfloat16, torch.float32,  (33,),   0.1,  "grouped"),
    ("fp16-decode-drop",   torch.float16,  torch.float16,  (18,),   0.2,  "decode"),
]


def check_grads(case, backend=None, K=38, N=52, device="cpu", *, fan_in_fan_out=False, train_weight=False):
    """One GRAD_CASES row at (K, N) on ``device``: y, dx, dbias and every adapter's dA, dB vs the float64
    oracle (Σ|terms| scales), PEFT's arithmetic as the baseline; all failures reported together; adapters
    absent from the batch get exactly-zero gradients. fan_in_fan_out: W stored (K, N) (GPT-2 Conv1D);
    train_weight: W requires grad, and dW (in W's stored layout) is checked too."""
    _, xdt, adt, lead, p, regime = case
    seed = 1234
    x, W, b, bank = setup(K, N, MIXED + (8,), xdt, adt, lead, requires_grad=True)
    x, W, b, bank = x.to(device), W.to(device), b.to(device), bank.to(device)
    kind = "per-seq" if len(lead) > 1 else "random"
    ids = make_ids(kind, len(bank), lead)
    ids[0] = len(bank) - 1 if kind == "random" else ids[0]
    ids = ids.to(device)
    x.requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    nk = (lambda w: w.t()) if fan_in_fan_out else (lambda w: w)     # stored layout -> (N, K)  # noqa: E731
    Ws = nk(W).contiguous().requires_grad_(train_weight)           # W as the layer stores it
    y = multi_lora_linear(x, Ws, bias, bank, ids, p, True, fan_in_fan_out, seed=seed, regime=regime,
                          backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(device, xdt)
    y.backward(dy)

    it = tok_ids(ids, x)
    keep = None                                        # the mask the op drew: its backend's for this seed
    if p > 0:
        keep = mask_of(select_backend(x.device, backend), seed, x.numel() // K, K, p, x.device)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    W64 = Ws.detach().double().requires_grad_(train_weight)
    ad64 = split(bank, torch.float64, requires_grad=True)
    oracle(x64, nk(W64), b64, ad64, it, p, keep).backward(dy.double())
    xb, bb = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    Wb = Ws.detach().clone().requires_grad_(train_weight)
    adb = split(bank, requires_grad=True)
    yb = baseline(xb, nk(Wb), bb, adb, it, p, keep)
    yb.backward(dy)

    sx, sbias, sad, *sW = abs_scales(x, nk(Ws), b, split(bank), it, p, keep, dy, weight_grad=train_weight)
    checks = [("y", y, oracle(x64.detach(), W.double(), b64.detach(), ad64, it, p, keep), yb, None),
              ("dx", x.grad, x64.grad, xb.grad, sx), ("dbias", bias.grad, b64.grad, bb.grad, sbias)]
    if train_weight:
        assert Ws.grad is not None and Ws.grad.shape == Ws.shape and Ws.grad.dtype == Ws.dtype
        checks.append(("dW", Ws.grad, W64.grad, Wb.grad, nk(sW[0]) if fan_in_fan_out else sW[0]))
    else:
        assert Ws.grad is None
    grads = [(A.grad, B.grad) for A, B, _ in map(bank.adapter, bank.names)]
    for k, r in enumerate(bank.ranks):
        checks += [(f"dA[{k}] r={r}", grads[k][0], ad64[k][0].grad, adb[k][0].grad, sad[k][0]),
                   (f"dB[{k}] r={r}", grads[k][1], ad64[k][1].grad, adb[k][1].grad, sad[k][1])]
    errors = []
    for name, got, ref, base, scale in checks:
        try:
            assert_close(name, got, ref, base, scale=scale)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)
    absent = set(range(len(bank))) - set(it.tolist())
    for k in absent:      # an adapter absent from the batch gets an exactly-zero gradient
        assert not grads[k][0].any() and not grads[k][1].any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_grad_parity(case, backend):
    check_grads(case, backend)


# GPT-2 Conv1D bases (weight stored (K, N), fan_in_fan_out), K != N so that a lost transpose cannot pass
CONV1D_FWD = [c for c in FWD_CASES if c[0] in ("fp32-mixed-unsorted", "torch-bf16-fp32ad")]


@pytest.mark.parametrize("case", CONV1D_FWD, ids=[c[0] for c in CONV1D_FWD])
def test_conv1d_base_forward(case):
    check_forward(case, fan_in_fan_out=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", GRAD_CASES[:3], ids=[c[0] for c in GRAD_CASES[:3]])
def test_conv1d_base_grads(case, backend):
    check_grads(case, backend, fan_in_fan_out=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[2]], ids=[GRAD_CASES[0][0], GRAD_CASES[2][0]])
def test_trainable_base_weight_gradient_multi(case, backend, fan_in_fan_out):
    """weight.requires_grad=True: dW in the base layer's layout, with and without fan_in_fan_out."""
    check_grads(case, backend, fan_in_fan_out=fan_in_fan_out, train_weight=True)


def test_one_adapter_matches_single_adapter_op():
    """With every token on adapter 0, the multi op is the single-adapter fused op (same dropout mask)."""
    import fastlora
    x, W, b, bank = setup(29, 35, (6,), torch.float32, torch.float32, (3, 7), requires_grad=True)
    ids = torch.zeros(3, dtype=torch.int32)
    y = multi_lora_linear(x, W, b, bank, ids, 0.3, True, seed=77)
    A, B, s = bank.adapter("ad0")
    y1 = fastlora.lora_linear(x, W, b, A.detach(), B.detach(), s, 0.3, True, seed=77)
    torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)


def test_scaling_is_a_runtime_value():
    """set_scaling changes the output through the scalings tensor, in place (same tensor object)."""
    x, W, b, bank = setup(16, 24, (4, 8), torch.float32, torch.float32, (10,))
    ids = torch.tensor([0, 1] * 5, dtype=torch.int32)
    before = bank.scalings
    y1 = multi_lora_linear(x, W, b, bank, ids)
    bank.set_scaling("ad1", 0.0)
    y0 = multi_lora_linear(x, W, b, bank, ids)
    assert bank.scalings is before
    torch.testing.assert_close(y0[1::2], torch.nn.functional.linear(x, W, b)[1::2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y0[0::2], y1[0::2], rtol=0, atol=0)


# ---------------------------------------------------------------------------
# CPU torch path: per-adapter segments (forced here; the cost model picks them only at larger shapes)
# ---------------------------------------------------------------------------

def force_segments(monkeypatch, gathered):
    """Make the CPU torch path run segments: in token order (runs of equal ids) or gathered by adapter.
    Returns the list of (function, gathered?) calls seen, so a test can prove the path ran."""
    import fastlora.ops.multi_reference as mr
    monkeypatch.setattr(mr, "_SEG_CALL", 1 if gathered else 0)
    monkeypatch.setattr(mr, "_SEG_COPY", 0 if gathered else 16)
    seen = []
    for fn in ("_segmented_forward", "_segmented_backward"):
        def spy(plan, *a, _orig=getattr(mr, fn), _fn=fn):
            seen.append((_fn, plan[0] is not None))
            return _orig(plan, *a)
        monkeypatch.setattr(mr, fn, spy)
    return seen


@pytest.mark.parametrize("gathered", [False, True], ids=["token-order", "gathered"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_cpu_segments_grad_parity(case, gathered, monkeypatch):
    seen = force_segments(monkeypatch, gathered)
    check_grads(case, "torch", fan_in_fan_out=case[0] == "fp32-decode")
    fragmented = len(case[3]) == 1        # random per-token ids; per-sequence ids are already in runs
    assert {f for f, _ in seen} == {"_segmented_forward", "_segmented_backward"}
    assert all(g == (gathered and fragmented) for _, g in seen)


TORCH_FWD = [c for c in FWD_CASES if c[-1] == "torch"] + [
    ("torch-fp32-per-seq", torch.float32, torch.float32, (8, 1, 16), (4, 6), "per-seq", "auto", "torch"),
    ("torch-fp16-all-base", torch.float16, torch.float16, MIXED, (20,), "none", "auto", "torch")]


@pytest.mark.parametrize("gathered", [False, True], ids=["token-order", "gathered"])
@pytest.mark.parametrize("case", TORCH_FWD, ids=[c[0] for c in TORCH_FWD])
def test_cpu_segments_forward_parity(case, gathered, monkeypatch):
    seen = force_segments(monkeypatch, gathered)
    check_forward(case)
    assert [f for f, _ in seen] == ["_segmented_forward"]


def test_cpu_cost_model_picks_segments_for_decode_and_dense_when_tiny():
    """32 adapters × 1 token at d 2048 (the issue's CPU case): segments; a 3-adapter toy layer: dense, decided
    from shapes alone (no host read of the plan)."""
    from fastlora.ops.multi_plan import plan_batch
    from fastlora.ops.multi_reference import _segments
    bank = make_bank(64, 48, (16,) * 32)
    x = torch.empty(32, 2048)
    plan = plan_batch(bank, torch.randperm(32).to(torch.int32), x[:, :64])
    assert _segments(plan, x, 32, 2048, 2048, 512, bank.offsets) is not None
    toy = make_bank(24, 20, (1, 8, 16))
    tiny = plan_batch(toy, torch.arange(18, dtype=torch.int32) % 3, x[:18, :24])
    assert _segments(tiny, x[:18, :24], 18, 24, 20, 25, toy.offsets) is None
    assert tiny._host == {}                                  # decided without reading the plan
    assert _segments(plan, x.to("meta"), 32, 2048, 2048, 512, bank.offsets) is None


def test_plan_host_reads_are_shared_by_layers(monkeypatch):
    """The CPU path reads a plan on the host once, however many layers use it."""
    from fastlora.ops.multi_plan import BatchPlan, plan_batch
    import fastlora.ops.multi_reference as mr
    monkeypatch.setattr(mr, "_SEG_CALL", 0)
    calls = []
    orig = BatchPlan.host_runs

    def spy(self):
        calls.append(bool(self._host))
        return orig(self)
    monkeypatch.setattr(BatchPlan, "host_runs", spy)
    x, W, b, bank = setup(40, 30, (4, 8, 2), torch.float32, torch.float32, (12,))
    plan = plan_batch(bank, torch.tensor([0, 1, 2, -1] * 3, dtype=torch.int32), x)
    ys = [multi_lora_linear(x, W, b, bank, plan=plan, backend="torch") for _ in range(3)]
    assert calls == [False, True, True] and all(torch.equal(y, ys[0]) for y in ys)


def test_cpu_segments_follow_a_bank_moved_in_place(monkeypatch):
    """The per-adapter views the CPU path caches follow the bank's storage: after bank.to(float16) (new packed
    buffers, the same adapter Parameter objects viewing them) and an in-place update, the layer computes with the
    new values."""
    force_segments(monkeypatch, gathered=False)
    x, W, b, bank = setup(40, 30, (4, 8, 2), torch.float32, torch.float32, (12,))
    ids = torch.tensor([0, 1, 2, -1] * 3, dtype=torch.int32)
    first = multi_lora_linear(x, W, b, bank, ids, backend="torch")
    A_param = bank.adapter("ad1")[0]
    bank.to(torch.float16)
    assert bank.adapter("ad1")[0] is A_param and A_param.dtype == torch.float16
    assert A_param.data_ptr() == bank.lora_A[4:].data_ptr()            # still a view of the packed buffer
    with torch.no_grad():
        bank.lora_B.mul_(2)
    second = multi_lora_linear(x.half(), W.half(), b.half(), bank, ids, backend="torch")
    ref = multi_lora_linear(x.half(), W.half(), b.half(), bank, ids, backend="torch", dropout_p=0.0)
    import fastlora.ops.multi_reference as mr
    monkeypatch.setattr(mr, "segments_enabled", False)
    dense = multi_lora_linear(x.half(), W.half(), b.half(), bank, ids, backend="torch")
    assert second.dtype == torch.float16 and torch.equal(second, ref)
    torch.testing.assert_close(second, dense, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(second.float(), first, rtol=1e-2, atol=1e-2)
