"""The op grid: every op family × entry point × backend, one cell each, the output and every gradient against its
float64 oracle (the plain-torch maths of the same dtype as the error baseline: tests/_tolerance.py).

    ops        lora (lora_linear), multi (multi_lora_linear), dora (dora_linear), qlora (qlora_linear on a
               bitsandbytes 4-bit base), moe (lora_experts)
    entries    eager-inference (no grad: the op's forward, no autograd), eager-training (forward + backward: the
               op's autograd.Function), compile (torch.compile, aot_eager, forward + backward: the registered ops,
               their fake kernels and autograd)
    backends   triton (the kernels, interpreted here: TRITON_INTERPRET=1), torch (the pure-torch path)

A cell the library does not serve is a skip with its reason (pytest -ra lists it), never a silent hole:
``NOT_SERVED`` (tests/_grid.py) names them, ``test_grid_declares_every_cell`` checks the table covers the grid,
and the session's summary prints the grid, one pass / skip / FAIL per cell. A backend is what ran: a triton cell
must launch Triton kernels in its forward and (but for ``NO_BACKWARD_KERNEL``) its backward, a torch cell none
(the launch spy: tests/_launches.py). Tiny shapes, no dropout (the masks have their own tests:
tests/ops/test_dropout.py); the depth is in each op's own test file.
"""
from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.ops.dora import dora_linear_reference
from fastlora.ops.moe import ExpertLora
from tests._grid import BACKENDS, ENTRIES, NO_BACKWARD_KERNEL, NOT_SERVED, OPS, grid_table
from tests._launches import launches  # noqa: F401  (the fixture)
from tests._tolerance import assert_baseline_sane, assert_close
from tests.ops.test_multi_parity import oracle as multi_oracle


def _rnd(g, *shape, std=1.0):
    return (torch.randn(*shape, generator=g) * std)


class Lora:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.W = _rnd(g, 10, 12, std=0.3)
        self.tensors = [_rnd(g, 2, 7, 12), _rnd(g, 10, std=0.1), _rnd(g, 3, 12, std=0.3), _rnd(g, 10, 3, std=0.3)]

    def leaves(self):
        return [t.clone().requires_grad_(True) for t in self.tensors]

    def inputs(self, leaves):
        return leaves

    def call(self, backend):
        return lambda x, b, A, B: fastlora.lora_linear(x, self.W, b, A, B, 0.5, backend=backend)

    def oracle(self, dtype):
        x, b, A, B = leaves = [t.detach().to(dtype).requires_grad_(True) for t in self.tensors]
        return fastlora.lora_linear_reference(x, self.W.to(dtype), b, A, B, 0.5), leaves


class Multi:
    """Two adapters of ranks 2 and 3 and base-only tokens (−1), ids per token."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.W = _rnd(g, 10, 12, std=0.3)
        self.tensors = [_rnd(g, 9, 12), _rnd(g, 10, std=0.1), _rnd(g, 2, 12, std=0.3), _rnd(g, 10, 2, std=0.3),
                        _rnd(g, 3, 12, std=0.3), _rnd(g, 10, 3, std=0.3)]
        self.ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1])
        self.alphas = (1.0, 1.5)
        self.bank = None

    def leaves(self):
        bank = self.bank = fastlora.AdapterBank(12, 10, requires_grad=True)
        for i, (A, B) in enumerate(zip(self.tensors[2::2], self.tensors[3::2])):
            bank.add(f"a{i}", A, B, alpha=self.alphas[i])
        return [self.tensors[0].clone().requires_grad_(True), self.tensors[1].clone().requires_grad_(True)] + \
            [p for i in range(2) for p in (bank.lora_A_params[f"a{i}"], bank.lora_B_params[f"a{i}"])]

    def inputs(self, leaves):
        return leaves[:2]                   # the adapters travel in the bank

    def call(self, backend):
        return lambda x, b: fastlora.multi_lora_linear(x, self.W, b, self.bank, self.ids, backend=backend)

    def oracle(self, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in self.tensors]
        adapters = [(leaves[2 + 2 * k], leaves[3 + 2 * k], self.alphas[k] / leaves[2 + 2 * k].shape[0])
                    for k in range(2)]
        return multi_oracle(leaves[0], self.W.to(dtype), leaves[1], adapters, self.ids, 0.0, None), leaves


class Dora(Lora):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.tensors.append(torch.rand(10, generator=g) + 0.5)      # the magnitude m

    def call(self, backend):
        return lambda x, b, A, B, m: fastlora.dora_linear(x, self.W, b, A, B, m, 0.5, backend=backend)

    def oracle(self, dtype):
        x, b, A, B, m = leaves = [t.detach().to(dtype).requires_grad_(True) for t in self.tensors]
        return dora_linear_reference(x, self.W.to(dtype), b, A, B, m, 0.5), leaves


class QLora:
    """A bitsandbytes NF4 Linear4bit base (float32 compute), float32 adapters: the oracle is the same maths on
    bitsandbytes' own dequantized weight."""

    def __init__(self):
        bnb = pytest.importorskip("bitsandbytes")
        g = torch.Generator().manual_seed(3)
        base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(_rnd(g, 48, 64, std=0.1), requires_grad=False, quant_type="nf4")
        base.bias = torch.nn.Parameter(_rnd(g, 48, std=0.1), requires_grad=False)
        self.base = base.to("cpu")                       # bnb quantizes on the move to a device
        from fastlora.ops.qlora import dequantize
        self.W = dequantize(self.base, torch.float32)
        self.tensors = [_rnd(g, 5, 64), _rnd(g, 4, 64, std=0.2), _rnd(g, 48, 4, std=0.2)]

    def leaves(self):
        return [t.clone().requires_grad_(True) for t in self.tensors]

    def inputs(self, leaves):
        return leaves

    def call(self, backend):
        return lambda x, A, B: fastlora.qlora_linear(x, self.base, A, B, 2.0, backend=backend)

    def oracle(self, dtype):
        x, A, B = leaves = [t.detach().to(dtype).requires_grad_(True) for t in self.tensors]
        return fastlora.lora_linear_reference(x, self.W.to(dtype), self.base.bias.to(dtype), A, B, 2.0), leaves


class Moe:
    def __init__(self):
        from tests.ops.test_moe import Problem, swiglu
        self.prob, self.gate = Problem(T=6, H=12, I=8, E=3, K=2, r=2), swiglu

    def leaves(self):
        return self.prob.leaves()

    def inputs(self, leaves):
        return leaves

    def call(self, backend):
        p = self.prob
        return lambda x, w, A1, B1, A2, B2: fastlora.lora_experts(
            x, p.idx, w, p.W1, p.W2, self.gate, gate_up_lora=ExpertLora(A1, B1, p.s1),
            down_lora=ExpertLora(A2, B2, p.s2), backend=backend)

    def oracle(self, dtype):
        return self.prob.reference(dtype)                   # the per-slot oracle (tests/ops/test_moe.py)


CASES = {"lora": Lora, "multi": Multi, "dora": Dora, "qlora": QLora, "moe": Moe}


def _oracle(case, dtype, dy):
    """(y, gradients) of the oracle in ``dtype`` (float64: the reference; float32: the error baseline)."""
    y, leaves = case.oracle(dtype)
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("op", OPS)
def test_cell(op, entry, backend, launches):
    if (op, entry) in NOT_SERVED:
        pytest.skip(f"{op} × {entry}: not served: {NOT_SERVED[op, entry]}")
    case = CASES[op]()
    leaves = case.leaves()
    fn = case.call(backend)
    if entry == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    launches.clear()
    if entry == "eager-inference":
        with torch.no_grad():
            y = fn(*case.inputs(leaves))
        got = [y]
    else:
        y = fn(*case.inputs(leaves))
    n_forward = len(launches)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref, base = _oracle(case, torch.float64, dy), _oracle(case, torch.float32, dy)
    if entry != "eager-inference":
        y.backward(dy.to(y.dtype))
        got = [y.detach()] + [t.grad for t in leaves]
        assert all(t is not None for t in got), f"{op}: a gradient is missing"
    n_backward = len(launches) - n_forward
    if backend == "torch":
        assert not launches, f"{op} {entry} torch: Triton launches {[r.kernel for r in launches]}"
    else:
        assert n_forward, f"{op} {entry} triton: the forward launched no Triton kernel"
        if entry != "eager-inference" and op not in NO_BACKWARD_KERNEL:
            assert n_backward, f"{op} {entry} triton: the backward launched no Triton kernel"
    for i, (a, r, b) in enumerate(zip(got, ref, base)):
        name = f"{op} {entry} {backend} " + ("y" if i == 0 else f"grad {i - 1}")
        assert_baseline_sane(name, b, r)                    # the baseline is the oracle's maths, so the bound bites
        assert_close(name, a, r, b)


def test_grid_declares_every_cell():
    """The grid is the product of the three axes, every op has a case, and a not-served cell names a real op and
    entry with a reason (a stale entry would hide a cell that now works)."""
    assert set(CASES) == set(OPS)
    for (op, entry), why in NOT_SERVED.items():
        assert op in OPS and entry in ENTRIES and why.strip(), (op, entry, why)
    assert set(NO_BACKWARD_KERNEL) <= set(OPS) and all(why.strip() for why in NO_BACKWARD_KERNEL.values())


def test_grid_table_shows_every_cell():
    """The session's grid (tests/_grid.py): a row per op, a column per (entry, backend), each cell's outcome in
    its place, a cell that did not run as '-'."""
    table = grid_table({("lora", "eager-inference", "triton"): "pass", ("qlora", "compile", "torch"): "skip",
                        ("moe", "eager-training", "torch"): "FAIL"}).splitlines()
    assert len(table) == 2 + len(OPS)
    assert all(e in table[0] for e in ENTRIES) and table[1].split() == list(BACKENDS) * len(ENTRIES)
    rows = {ln.split()[0]: ln.split()[1:] for ln in table[2:]}
    assert list(rows) == list(OPS) and all(len(r) == len(ENTRIES) * len(BACKENDS) for r in rows.values())
    assert rows["lora"][0] == "pass" and rows["qlora"][5] == "skip" and rows["moe"][3] == "FAIL"
    assert sum(c != "-" for r in rows.values() for c in r) == 3
