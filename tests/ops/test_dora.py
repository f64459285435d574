"""DoRA (fastlora.ops.dora): PEFT's use_dora layers served without the N×K matrix W0 + s·B·A.

* parity with PEFT's DoRA (patched PEFT models) and with the plain-torch reference, each against a float64
  oracle under the tolerance idiom (tests/_tolerance.py): the output and every gradient (x, lora_A, lora_B,
  the magnitude, a trainable bias), fp32 / bf16 / fp16, half and fp32 adapters, with and without dropout
  (the same mask on both sides: tests/_replay.py), fan_in_fan_out (GPT-2 Conv1D); on the pure-torch backend
  and on the Triton norm kernel (interpreted, TRITON_INTERPRET=1 from conftest);
* the norm pass (kernel and torch) against float64, including rank chunks (r > 64) and the cached ‖W0‖²;
* no N×K temporary: saved-tensor hooks, and every op's output inside forward and backward (a dispatch mode
  that also walks into fastlora's custom ops) — both checks are shown to catch PEFT's N×K tensors;
* DoraLinear (PEFT's initialisation, merge / unmerge semantics, exact bytes after cycles), patch / unpatch,
  PEFT checkpoints through fastlora.integrations.checkpoint, bad input.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import fastlora
import fastlora.integrations.peft_dora as fpd
import fastlora.nn.dora as fnd
import fastlora.ops.dora as fd
import fastlora.kernels.dora_norm as kdn
from fastlora.core.dropout import torch_keep_mask
from fastlora.integrations.checkpoint import AdapterLoadError, load_peft_adapter, save_peft_adapter
from tests._replay import replay_dropout
from tests._tolerance import assert_baseline_sane, assert_close
from tests.integrations.test_patch_peft import run

BACKENDS = ("torch", "triton")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


# ----------------------------------------------------------------------------- PEFT models

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.conv = Conv1D(32, 40)               # GPT-2 style: weight (40, 32), fan_in_fan_out
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.conv(torch.tanh(self.up(x)))))


TARGETS = ["up", "conv", "down"]


def tiny_dora(dtype=F32, dropout=0.0, adapter_dtype=None, trainable_bias=True, seed=0):
    """A PEFT DoRA model (r 4, alpha 8) with B ≠ 0 and m ≠ ‖W0 + s·B·A‖, so every term of DoRA matters."""
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PEFT: "fan_in_fan_out set to True for Conv1D"
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                             target_modules=TARGETS),
                            autocast_adapter_dtype=adapter_dtype is None or adapter_dtype == F32)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand_like(p) + 0.5)
    if trainable_bias:
        for m in (pm.base_model.model.up, pm.base_model.model.conv):
            m.base_layer.bias.requires_grad_(True)
    return pm




@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = fd.dora_linear
    for module in (fd, fnd, fpd):       # the functional, and where the module and the PEFT hook read it
        monkeypatch.setattr(module, "dora_linear", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    return calls


# (x dtype, adapter dtype): PEFT's default on a half base is fp32 adapters; half adapters with
# autocast_adapter_dtype=False
DTYPES = [(F32, F32), (BF16, F32), (F16, F32), (F16, F16), (BF16, BF16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("dtype,adt", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_patched_peft_parity(monkeypatch, spy, backend, dropout, dtype, adt):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    pm = tiny_dora(dtype, dropout, adt)
    layer = pm.base_model.model.up
    assert layer.lora_A["default"].weight.dtype == adt
    assert layer.lora_magnitude_vector["default"].weight.dtype == adt
    ref = replay_dropout(copy.deepcopy(pm), op="dora")
    o64 = replay_dropout(copy.deepcopy(pm).double(), op="dora")
    rep = fastlora.patch(pm)
    assert set(rep.patched) == {f"base_model.model.{n}" for n in TARGETS} and not rep.skipped
    x, g = torch.randn(2, 5, 24, dtype=dtype), torch.randn(2, 5, 16, dtype=dtype)
    y, dx, grads = run(pm, x, g)
    assert len(spy) == 3 and y.dtype == dtype
    ry, rdx, rgrads = run(ref, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    if dtype == F32:                                     # PEFT computes the oracle's maths (same masks)
        assert_baseline_sane("y", ry, oy)
        assert_baseline_sane("dx", rdx, odx)
    assert_close("y", y, oy, ry)
    assert_close("dx", dx, odx, rdx)
    # 3 layers × (lora_A, lora_B, magnitude) + 2 biases
    assert set(grads) == set(rgrads) and len(grads) == 11
    assert sum("lora_magnitude_vector" in n for n in grads) == 3
    for n in grads:
        assert grads[n].dtype == rgrads[n].dtype, n
        assert_close(n, grads[n], ograds[n], rgrads[n])
    pm.eval(), ref.eval(), o64.eval()
    with torch.no_grad():
        assert_close("eval y", pm(x), o64(x.double()), ref(x))
    assert len(spy) == 6


# ----------------------------------------------------------------------------- functional vs the reference

# (x shape, K, N, r, x dtype, adapter dtype, p, fan_in_fan_out, bias)
CASES = [
    ((1,), 5, 3, 1, F32, F32, 0.0, False, True),
    ((2, 3), 33, 17, 70, F32, F32, 0.3, True, True),          # r > 64: the kernel walks two rank chunks
    ((7,), 24, 19, 8, BF16, F32, 0.2, False, True),
    ((3, 5), 20, 12, 3, F16, F16, 0.0, True, False),
    ((4,), 16, 16, 4, BF16, BF16, 0.1, False, True),
]


def dora_mask(seed, x, p):
    """The mask dora_linear draws for ``seed`` on CPU tensors, on every backend (its GEMMs and dropout are torch
    code): fastlora.core.dropout.torch_keep_mask; None without dropout."""
    return torch_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p) if p > 0 else None


def _tensors(shape, K, N, r, dt, adt, ffo, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, d: torch.randn(*s, generator=g).to(d)  # noqa: E731
    W = rnd(N, K, d=dt) * 0.3
    t = dict(x=rnd(*shape, K, d=dt), weight=W.t().contiguous() if ffo else W,
             bias=rnd(N, d=dt) if bias else None, lora_A=rnd(r, K, d=adt) * 0.3, lora_B=rnd(N, r, d=adt) * 0.3)
    n = torch.linalg.vector_norm(W.double() + 2.0 * t["lora_B"].double() @ t["lora_A"].double(), dim=1)
    t["magnitude"] = (n * (torch.rand(N, generator=g, dtype=F64) + 0.5)).to(adt)
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-N{c[2]}-r{c[3]}-{str(c[4])[6:]}-"
                                                       f"{str(c[5])[6:]}-p{c[6]}-ffo{int(c[7])}")
def test_functional_parity(backend, case):
    shape, K, N, r, dt, adt, p, ffo, bias = case
    t = _tensors(shape, K, N, r, dt, adt, ffo, bias)
    g = torch.randn(*shape, N).to(dt)
    names = [k for k in ("x", "bias", "lora_A", "lora_B", "magnitude") if t[k] is not None]

    def go(fn, tensors, **kw):
        ts = {k: (v.detach().clone().requires_grad_(k in names) if v is not None else None)
              for k, v in tensors.items()}
        y = fn(ts["x"], ts["weight"], ts["bias"], ts["lora_A"], ts["lora_B"], ts["magnitude"], 2.0, p,
               fan_in_fan_out=ffo, seed=11, **kw)
        y.backward(g.to(y.dtype))
        return {"y": y.detach(), **{f"d{k}": ts[k].grad for k in names}}

    got = go(fd.dora_linear, t, backend=backend)
    keep = dora_mask(11, t["x"], p)                              # the mask dora_linear drew for seed 11
    base = go(fd.dora_linear_reference, t, keep=keep)            # plain torch in the same dtypes (PEFT's flow)
    o64 = go(fd.dora_linear_reference, {k: (v.double() if v is not None else None) for k, v in t.items()}, keep=keep)
    assert set(got) == set(base) == set(o64) and len(got) == len(names) + 1
    for k in got:
        assert got[k].dtype == base[k].dtype, k
        assert_close(k, got[k], o64[k], base[k])


@pytest.mark.parametrize("p,ffo", [(0.0, False), (0.3, True)])
def test_trainable_base_weight_gets_its_gradient(p, ffo):
    """Not what DoRA is for, but a W0 that requires grad gets dW (n stays detached, as in PEFT)."""
    t = _tensors((4,), 12, 10, 3, F32, F32, ffo, True)
    g = torch.randn(4, 10)
    out = {}
    ref = lambda *a, **k: fd.dora_linear_reference(*a, **k, keep=dora_mask(4, t["x"], p))  # noqa: E731
    for name, fn, ts in (("got", fd.dora_linear, t), ("base", ref, t),
                         ("o64", ref, {k: v.double() for k, v in t.items()})):
        w = ts["weight"].detach().clone().requires_grad_(True)
        x = ts["x"].detach().clone().requires_grad_(True)
        fn(x, w, ts["bias"], ts["lora_A"], ts["lora_B"], ts["magnitude"], 2.0, p, fan_in_fan_out=ffo,
           seed=4).backward(g.to(x.dtype))
        out[name] = (w.grad, x.grad)
    for i, n in enumerate(("dW", "dx")):
        assert_close(n, out["got"][i], out["o64"][i], out["base"][i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,ffo", [(0.0, False), (0.3, True)])
def test_gradcheck_float64(backend, p, ffo):
    """n is detached, so A and B are checked by the parity tests; x, m and bias here by finite differences."""
    t = _tensors((3,), 6, 5, 2, F64, F64, ffo, True)
    x, m, b = (t[k].requires_grad_(True) for k in ("x", "magnitude", "bias"))
    fn = lambda x, m, b: fd.dora_linear(x, t["weight"], b, t["lora_A"], t["lora_B"], m, 1.5, p,  # noqa: E731
                                        fan_in_fan_out=ffo, seed=3, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, m, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("save", [True, False])
def test_custom_ops_opcheck(backend, p, save):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch with dynamic shapes.
    save=False: the forward kept neither v nor S and the backward recomputes them."""
    t = _tensors((5,), 8, 6, 2, F32, F32, False, True)
    for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
        t[k].requires_grad_(True)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], None, torch.tensor(1.5), p,
            torch.tensor(3), False, save, save, backend)
    torch.library.opcheck(fd.dora_linear_fwd, args)
    _, v, S, n, _ = fd.dora_linear_fwd(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(fd.dora_linear_bwd, (torch.randn(5, 6), *plain[:1], plain[1], *plain[3:6], n, v, S,
                                               torch.tensor(1.5), p, torch.tensor(3), False, True, True, True, True,
                                               True, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces dora_linear (the custom ops, not the eager autograd.Function): compiled
    and eager y and gradients each against the float64 reference (same mask), the float32 reference as baseline."""
    import torch._dynamo
    torch._dynamo.reset()
    t = _tensors((3, 5), 24, 20, 4, F32, F32, False, True)
    names = ("x", "bias", "lora_A", "lora_B", "magnitude")

    def step(fn, tensors):
        ts = {k: (v.detach().clone().requires_grad_(k in names) if v is not None else None) for k, v in tensors.items()}
        y = fn(ts)
        y.backward(torch.ones_like(y))
        return [y.detach()] + [ts[k].grad for k in names]
    ours = lambda ts: fd.dora_linear(ts["x"], ts["weight"], ts["bias"], ts["lora_A"], ts["lora_B"],  # noqa: E731
                                     ts["magnitude"], 2.0, 0.1, seed=torch.tensor(5), backend=backend)
    compiled = torch.compile(ours, fullgraph=True)
    ref = lambda ts: fd.dora_linear_reference(ts["x"], ts["weight"], ts["bias"], ts["lora_A"],  # noqa: E731
                                              ts["lora_B"], ts["magnitude"], 2.0, 0.1, keep=dora_mask(5, t["x"], 0.1))
    o64 = step(ref, {k: (v.double() if v is not None else None) for k, v in t.items()})
    base = step(ref, t)
    for kind, got in (("compiled", step(compiled, t)), ("eager", step(ours, t))):
        for name, g, o, b in zip(("y",) + names, got, o64, base):
            assert_close(f"{kind} {name}", g, o, b)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the norm pass

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K,r,wdt,adt,ffo", [(37, 29, 4, F32, F32, False), (21, 45, 70, F32, F32, True),
                                                (33, 18, 20, BF16, F32, True), (19, 40, 3, F16, F16, False)])
def test_weight_norm_vs_float64_and_peft(backend, N, K, r, wdt, adt, ffo):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(N, K, generator=g).to(wdt)
    A, B = torch.randn(r, K, generator=g).to(adt) * 0.3, torch.randn(N, r, generator=g).to(adt) * 0.3
    Wst = W.t().contiguous() if ffo else W
    s = torch.tensor(1.25)
    n, w2 = fd.norm_forward(Wst, A, B, s, ffo, None, backend)
    n64 = torch.linalg.vector_norm(W.double() + 1.25 * B.double() @ A.double(), dim=1)
    assert n.dtype == F32 and w2.dtype == F32
    torch.testing.assert_close(w2.double(), W.double().square().sum(1), rtol=1e-6, atol=0)
    # PEFT's DoraLinearLayer.get_weight_norm in the adapter dtype (its DoRA branch runs there)
    peft_n = torch.linalg.vector_norm(W.to(adt) + 1.25 * (B @ A), dim=1).float()
    assert_close("n", n, n64, peft_n)
    assert (n.double() - n64).abs().max() <= 1e-6 * n64.max()
    n2, w2b = fd.norm_forward(Wst, A, B, s, ffo, w2, backend)       # the cached ‖W0‖² is read, not recomputed
    assert w2b is w2 and torch.equal(n2, n)


def test_norm_cache_follows_w0_versions(monkeypatch):
    t = _tensors((4,), 12, 10, 2, F32, F32, False, True)
    calls = []                                           # per call: was ‖W0‖² computed (not read from the cache)?
    real = fd.forward
    monkeypatch.setattr(fd, "forward", lambda *a: calls.append(a[6] is None) or real(*a))
    fd.clear_norm_cache()
    args = lambda: (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0)  # noqa: E731
    y0 = fd.dora_linear(*args(), backend="torch")
    fd.dora_linear(*args(), backend="torch")
    assert calls == [True, False]                        # second call read the cached ‖W0‖²
    with torch.no_grad():
        t["weight"].mul_(2)                              # in place: version counter moves, cache misses
    y1 = fd.dora_linear(*args(), backend="torch")
    assert calls[-1] is True
    ref = fd.dora_linear_reference(*args())
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y0, y1)
    for k in ("x", "lora_A", "lora_B", "magnitude"):     # training steps reuse the cache: no graph links between them
        t[k].requires_grad_(True)
    grads = []
    for _ in range(3):
        for k in ("x", "lora_A", "lora_B", "magnitude"):
            t[k].grad = None
        fd.dora_linear(*args(), backend="torch").sum().backward()
        grads.append([t[k].grad.clone() for k in ("x", "lora_A", "lora_B", "magnitude")])
    assert calls[-3:] == [False, False, False]
    for a, b in zip(grads[0], grads[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    t["weight"].requires_grad_(True)                     # a trainable W0 is never cached
    fd.dora_linear(*args(), backend="torch")
    fd.dora_linear(*args(), backend="torch")
    assert calls[-2:] == [True, True]


# ----------------------------------------------------------------------------- no N×K temporary

M_, K_, N_, R_ = 6, 40, 24, 4     # N·K = 960 is larger than M·K, M·N and K·K is larger still (PEFT's eye(K))


def _problem(wdt=F32, adt=F32):
    t = _tensors((M_,), K_, N_, R_, wdt, adt, False, True)
    for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
        t[k].requires_grad_(True)
    return t


def _peft_layer(t):
    lin = nn.Linear(K_, N_).to(t["weight"].dtype)
    with torch.no_grad():
        lin.weight.copy_(t["weight"])
    pm = get_peft_model(nn.Sequential(lin), LoraConfig(r=R_, lora_alpha=8, use_dora=True, target_modules=["0"]))
    return pm


def _saved_numels(fn, weight):
    """numel of every tensor autograd saves while fn runs, except W0 itself (a parameter, not a temporary)."""
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_nxk_saved_for_backward(backend, p):
    t = _problem()
    sizes = _saved_numels(lambda: fd.dora_linear(*t.values(), 2.0, p, seed=1, backend=backend).sum().backward(),
                          t["weight"])
    assert sizes and max(sizes) < N_ * K_, sizes
    pm = _peft_layer(t)                                  # the check can fail: PEFT's DoRA saves K×K / N×K tensors
    peft_sizes = _saved_numels(lambda: pm(t["x"]).sum().backward(), pm.base_model.model[0].base_layer.weight)
    assert max(peft_sizes) >= N_ * K_


class _Allocations(TorchDispatchMode):
    """Largest output (numel) of any non-view op, walking into fastlora's custom ops; ops run by the Triton
    interpreter inside a kernel launch (its host copies; no such thing on a GPU) are not counted."""
    OPS = {"dora_linear_fwd": fd.dora_linear_fwd, "dora_linear_bwd": fd.dora_linear_bwd}

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.in_kernel = 0, None, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastlora":
            with self:
                return self.OPS[func._opname]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if not func.is_view and not self.in_kernel:
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.numel() > self.largest:
                    self.largest, self.op = o.numel(), str(func)
        return out


class _Launch:
    def __init__(self, kernel, mode):
        self.kernel, self.mode = kernel, mode

    def __getitem__(self, grid):
        def launch(*a, **k):
            self.mode.in_kernel = True
            try:
                return self.kernel[grid](*a, **k)
            finally:
                self.mode.in_kernel = False
        return launch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("wdt,adt", [(F32, F32), (BF16, F32)], ids=["fp32", "bf16-fp32"])
def test_no_nxk_temporary_in_forward_or_backward(monkeypatch, backend, p, wdt, adt):
    mode = _Allocations()
    monkeypatch.setattr(kdn, "_dora_norm_kernel", _Launch(kdn._dora_norm_kernel, mode))
    monkeypatch.setattr(fd, "NORM_BLOCK_ELEMENTS", 4 * K_)   # a half W0 is upcast 4 rows at a time
    t = _problem(wdt, adt)
    fd.clear_norm_cache()
    with mode:
        fd.dora_linear(*t.values(), 2.0, p, seed=1, backend=backend).sum().backward()
    assert all(t[k].grad is not None for k in ("x", "bias", "lora_A", "lora_B", "magnitude"))
    assert 0 < mode.largest < N_ * K_, (mode.largest, mode.op)
    pm = _peft_layer(t)
    peft = _Allocations()
    with peft:
        pm(t["x"]).sum().backward()
    assert peft.largest >= N_ * K_                       # the check can fail: PEFT builds B·A and W0 + s·B·A


# ----------------------------------------------------------------------------- DoraLinear, merge

def test_dora_linear_module_matches_peft_layer():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    layer = fnd.DoraLinear.from_linear(lin, r=4, lora_alpha=8)
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"]
    pm = get_peft_model(nn.Sequential(copy.deepcopy(lin)), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=["0"]))
    pl = pm.base_model.model[0]
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(layer.lora_A)
    # PEFT's initialisation (B = 0): m = ‖W0‖ per row, computed from the same weight
    torch.testing.assert_close(layer.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight,
                               rtol=1e-6, atol=0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(20) + 0.5)
        pl.lora_B["default"].weight.copy_(layer.lora_B)
        pl.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    o64 = copy.deepcopy(pm).double()
    x, g = torch.randn(5, 24), torch.randn(5, 20)
    y, dx, grads = run(layer, x, g)
    ry, rdx, rgrads = run(pm, x, g)
    oy, odx, ograds = run(o64, x.double(), g.double())
    assert_close("y", y, oy, ry)
    assert_close("dx", dx, odx, rdx)
    for mine, theirs in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                         ("lora_magnitude_vector", "lora_magnitude_vector.default.weight")):
        key = f"base_model.model.0.{theirs}"
        assert_close(mine, grads[mine], ograds[key], rgrads[key])


@pytest.mark.parametrize("dtype,ffo", [(F32, False), (BF16, True)])
def test_merge_matches_peft_and_unmerge_restores_exact_bytes(dtype, ffo):
    torch.manual_seed(0)
    base = Conv1D(20, 24) if ffo else nn.Linear(24, 20)
    base = base.to(dtype)
    layer = fnd.DoraLinear.from_linear(base, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(20) + 0.5)
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    layer.eval()
    assert layer.merged                                      # merge_weights: eval() merges
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        y_merged = layer(x)
        layer.unmerge()
        y_unmerged = layer(x)
        layer.merge()
    assert torch.equal(layer.weight, merged)
    # PEFT's merge of the same adapter, and the float64 merge
    ffo_w = lambda w: w.t() if ffo else w  # noqa: E731
    pm = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                        target_modules=["0"]))
    pl = pm.base_model.model[0]
    with torch.no_grad():
        pl.get_base_layer().weight.copy_(w0)
        pl.lora_A["default"].weight.copy_(layer.lora_A)
        pl.lora_B["default"].weight.copy_(layer.lora_B)
        pl.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    pl.merge()
    full64 = ffo_w(w0).double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()
    m64 = layer.lora_magnitude_vector.double() / torch.linalg.vector_norm(full64, dim=1)
    merged64 = ffo_w(m64[:, None] * full64)
    assert_close("merged W", merged, merged64, pl.get_base_layer().weight.detach())
    scale = x.double().abs() @ ffo_w(merged64).abs().t() + layer.bias.double().abs()
    torch.testing.assert_close(y_merged.double(), y_unmerged.double(), rtol=0,
                               atol=4 * fastlora_eps(dtype) * scale.max().item())
    for _ in range(20):
        layer.unmerge()
        assert torch.equal(layer.weight.view(torch.int16 if dtype == BF16 else torch.int32),
                           w0.view(torch.int16 if dtype == BF16 else torch.int32))
        layer.merge()
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, w0)


def fastlora_eps(dtype):
    return {F32: 2.0 ** -23, BF16: 2.0 ** -7, F16: 2.0 ** -10}[dtype]


def test_safe_merge_rejects_non_finite_and_leaves_w0():
    layer = fnd.DoraLinear(8, 6, r=2, merge_weights=False)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


# ----------------------------------------------------------------------------- patch / unpatch

def test_patch_keys_fallbacks_and_unpatch(spy):
    pm = tiny_dora()
    ref = copy.deepcopy(pm)
    keys = {k: tuple(v.shape) for k, v in pm.state_dict().items()}
    assert sum("lora_magnitude_vector" in k for k in keys) == 3
    fastlora.patch(pm)
    assert {k: tuple(v.shape) for k, v in pm.state_dict().items()} == keys
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(spy) == 3
        with pm.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
        pm.merge_adapter(), ref.merge_adapter()          # merged: PEFT's own forward (DoRA merge semantics)
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
        pm.unmerge_adapter(), ref.unmerge_adapter()
        assert len(spy) == 3
        torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(spy) == 6
    assert sorted(fastlora.unpatch(pm)) == sorted(f"base_model.model.{n}" for n in TARGETS)
    assert not any(fastlora.is_patched(m) for m in pm.modules())
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)
    assert len(spy) == 6
    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patched_dora_under_cpu_autocast_runs_fused(monkeypatch, spy, backend, dropout):
    """DoRA inside torch.autocast(bf16) runs fused with autocast's semantics (x, W0, bias, A, B cast to bf16; the
    magnitude as it is): the loss, output, dx and every gradient within 2x PEFT's own error under the same
    autocast, against the float64 model whose autocast-read weights are rounded to bf16 (tests/ops/test_autocast.py).
    atol: 1 bf16 ulp (the idiom's half-precision atol): the gradients come back in fp32 but are bf16 GEMM results,
    and with dropout the fused op drops x after autocast's cast where PEFT drops it before (one more rounding of
    x̃ = x⊙keep/(1 − p), within that ulp)."""
    from tests.ops.test_autocast import BF16 as AMP, compare, oracle, step
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    pm = tiny_dora(dropout=dropout)
    ref, o64 = replay_dropout(copy.deepcopy(pm), "dora"), replay_dropout(oracle(pm, AMP), "dora")
    assert len(fastlora.patch(pm).patched) == 3
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    with fastlora.trace() as t:
        got = step(pm, x, g, AMP)
    assert t.fused == 3 and t.fallbacks == {} and len(spy) == 3
    want, o = step(ref, x, g, AMP), step(o64, x.double(), g.double(), None)
    loss, rloss, oloss = (r[0].double().mul(g.double()).sum() for r in (got, want, o))   # the loss y·g
    assert abs(loss - oloss) <= 2 * abs(rloss - oloss) + EPS_BF16 * (o[0].abs().double() * g.abs()).sum()
    compare(got, want, o, AMP, sane=False, atol_dtype=AMP)   # PEFT's norm reads W0 unrounded: not the oracle's


EPS_BF16 = 2.0 ** -7


# ----------------------------------------------------------------------------- checkpoints

def test_peft_dora_checkpoint_load_and_save(tmp_path):
    pm = tiny_dora(trainable_bias=False)
    pm.save_pretrained(tmp_path / "peft")
    model = Tiny()
    model.load_state_dict({k.replace("base_model.model.", "").replace("base_layer.", ""): v
                           for k, v in pm.state_dict().items() if "lora_" not in k})
    loaded = load_peft_adapter(model, str(tmp_path / "peft"))
    assert set(loaded) == set(TARGETS) and all(type(m) is fnd.DoraLinear for m in loaded.values())
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-5)
    cfg = save_peft_adapter(model, str(tmp_path / "ours"))
    assert cfg["use_dora"] is True
    base = Tiny()
    base.load_state_dict(model.state_dict(), strict=False)    # the same base weights (adapter keys ignored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    for n in TARGETS:
        ours, theirs = getattr(pm.base_model.model, n), getattr(again.base_model.model, n)
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            assert torch.equal(getattr(ours, part)["default"].weight, getattr(theirs, part)["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pm(x), rtol=1e-6, atol=1e-6)


def test_dora_checkpoint_errors_name_the_key_and_leave_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file
    pm = tiny_dora(trainable_bias=False)
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.conv.lora_magnitude_vector"
    for edit, message in ((lambda d: d.pop(key), r"missing key base_model\.model\.conv\.lora_magnitude_vector"),
                          (lambda d: d.__setitem__(key, torch.ones(7)),
                           r"module 'conv': expected a floating-point lora_magnitude_vector \(32,\)")):
        d = dict(t)
        edit(d)
        save_file(d, f)
        model = Tiny()
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(AdapterLoadError, match=message):
            load_peft_adapter(model, str(tmp_path))
        assert {n: type(m) for n, m in model.named_modules()} == before
        assert model.up.weight.requires_grad


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument():
    t = _tensors((3,), 8, 6, 2, F32, F32, False, True)
    call = lambda **o: fd.dora_linear(**{**t, **o}, scaling=1.0)  # noqa: E731
    with pytest.raises(TypeError, match=r"^magnitude must be a torch\.Tensor"):
        call(magnitude=[1.0] * 6)
    with pytest.raises(ValueError, match=r"^magnitude must have shape \(6,\) \(out_features\), got \(6, 1\)"):
        call(magnitude=torch.ones(6, 1))
    with pytest.raises(TypeError, match=r"^magnitude must have x's dtype torch\.float32, got torch\.float16"):
        call(magnitude=torch.ones(6, dtype=F16))
    with pytest.raises(ValueError, match=r"^magnitude must be on x's device cpu, got meta"):
        call(magnitude=torch.empty(6, device="meta"))
    with pytest.raises(ValueError, match=r"^lora_B must have shape \(6, 2\)"):
        call(lora_B=torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"^dropout_p must be a float in \[0, 1\)"):
        call(dropout_p=1.0)
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        call(backend="cuda")


# ----------------------------------------------------------------------------- compile for the GPU

@pytest.mark.slow
def test_norm_kernel_compiles_for_sm80_sm90_without_spills():
    """The heaviest shipped norm configs (rank block 64, ‖W0‖² accumulated; split fp32 adapters on bf16, and fp32
    with ieee dots), every tile, sm_80 and sm_90: zero spills (python -m fastlora.inspect, no interpreter). The
    whole matrix: python -m fastlora.inspect --only dora (120 compiles, all ok, 2026-12-02)."""
    import os
    import re
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    only = r"dora_norm W=(bf16 A=bf16 B=fp32|fp32 A=fp32 B=fp32/ieee)[^ ]* w2=1 .* r64 "
    proc = subprocess.run([sys.executable, "-m", "fastlora.inspect", "--only", only, "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("dora_norm")]
    sms = [r.split()[-6] for r in rows]
    assert len(rows) == 6, rows                          # (2 half tiles + 1 fp32 tile) × (sm_80, sm_90)
    assert sms.count("80") == sms.count("90") == 3, rows
    assert all(r.rstrip().endswith("ok") for r in rows), "\n".join(rows)
    assert all(re.search(r"w2=1 .* r64 ", r) for r in rows)


# ----------------------------------------------------------------------------- the benchmark script runs

def test_bench_dora_dry_run(tmp_path):
    """benchmarks/bench_dora.py end to end at a tiny size (its PEFT agreement check included); not a timing test."""
    from benchmarks import bench_dora, common
    threads = torch.get_num_threads()
    try:
        assert bench_dora.main(["--d", "32", "--tokens", "8", "--r", "2", "--rounds", "2", "--warmup", "0",
                                "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    per = common.read_csv(tmp_path / "dora_cpu.csv")
    ratios = common.read_csv(tmp_path / "dora_ratios_cpu.csv")
    assert {r["provider"] for r in per} == {"base", "peft_lora", "peft_dora", "fastlora_lora", "fastlora_dora"}
    assert [r["pair"] for r in ratios] == [f"{a}/{b}" for a, b in bench_dora.PAIRS]
    assert all(float(r["median_ratio"]) > 0 and r["rounds"] == "2" for r in ratios)
