"""Parity of fastlora.lora_linear (y, dx, dA, dB, dbias) with a float64 oracle and with PEFT.

Every case runs three computations on the same inputs and the same dropout mask:
  * fastlora.lora_linear on the backend under test ("triton" = the real kernels, interpreted on
    CPU because tests/conftest.py sets TRITON_INTERPRET=1; "torch" = the pure-torch path);
  * fastlora.lora_linear_reference on float64 copies (the oracle; autograd gives its gradients);
  * PEFT's ``peft.tuners.lora.Linear`` in the case's dtypes, around an nn.Linear (or a
    transformers Conv1D for fan_in_fan_out), its dropout replaced by that backend's mask for SEED
    (the kernels' Philox mask, or the torch path's torch.rand mask: tests/_replay.py mask_of).
PEFT is the baseline of the tolerance idiom (tests/_tolerance.py): fastlora's error vs float64
must be <= 2x PEFT's + atol, and PEFT itself must agree with the oracle (same maths).

Cases: a pairwise covering design over dtype mode x rank x M x layout x (K, N) x bias x
fan_in_fan_out x dropout (every pair of levels appears in some case), plus full one-axis sweeps
of rank, M, dtype mode and layout. The full product (15,000 cases) would take hours interpreted.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastlora import lora_linear, lora_linear_reference
from tests._replay import mask_of
from tests._tolerance import assert_baseline_sane, assert_close

SEED = 1234                      # dropout seed shared by fastlora, the oracle and PEFT
BACKENDS = ["triton", "torch"]
PAIRWISE_BACKENDS = BACKENDS
# dtype mode -> (x / W0 / bias dtype, lora_A / lora_B dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16+fp32": (torch.float16, torch.float32),     # PEFT's default: fp32 adapters on a half base
    "bf16+fp32": (torch.bfloat16, torch.float32),
}
LAYOUTS = ("contig", "3d", "slice", "t", "3d_t")


@dataclass(frozen=True)
class Case:
    dtype: str = "bf16+fp32"
    r: int = 8
    M: int = 33
    KN: tuple = (33, 17)        # (in_features K, out_features N), never multiples of 16
    layout: str = "3d"
    bias: bool = True
    fan_in_fan_out: bool = False
    p: float = 0.1

    @property
    def id(self) -> str:
        K, N = self.KN
        return (f"{self.dtype}-r{self.r}-M{self.M}-K{K}N{N}-{self.layout}-{'bias' if self.bias else 'nobias'}"
                f"{'-fifo' if self.fan_in_fan_out else ''}-p{self.p}")


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def _split(M: int) -> tuple[int, int]:
    """M = B * T with B the smallest divisor > 1 (B = 1 for M = 1 or prime; (2, 0) for M = 0)."""
    if M == 0:
        return 2, 0
    B = next((d for d in range(2, M) if M % d == 0), 1)
    return B, M // B


def layout_ok(layout: str, M: int) -> bool:
    """3d_t needs B, T > 1 so that its leading dims really cannot be collapsed by a view."""
    return layout != "3d_t" or M == 0 or _split(M)[0] > 1 and _split(M)[1] > 1


def make_x(vals: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf tensor with vals' (M, K) values (row-major order of its leading dims) in ``layout``.

    contig (M, K) · 3d (B, T, K) · slice: (M, K) column slice of an (M, K + 7) tensor ·
    t: (M, K) with transposed storage (strides (1, M)) · 3d_t: (T, B, K) = (B, T, K).transpose(0, 1),
    whose leading dims cannot be collapsed by a view.
    """
    M, K = vals.shape
    B, T = _split(M)
    if layout == "contig":
        x = vals.clone()
    elif layout == "3d":
        x = vals.reshape(B, T, K).clone()
    elif layout == "slice":
        wide = torch.zeros(M, K + 7, dtype=vals.dtype)
        wide[:, 3:3 + K] = vals
        x = wide[:, 3:3 + K]
    elif layout == "t":
        x = vals.t().contiguous().t()
    elif layout == "3d_t":
        buf = torch.zeros(B, T, K, dtype=vals.dtype)
        x = buf.transpose(0, 1)
        x.copy_(vals.reshape(T, B, K))
    else:
        raise AssertionError(layout)
    return x.detach().requires_grad_()     # detach keeps the strides; the view becomes a leaf


@dataclass
class Problem:
    """One set of inputs; tensors in the case's dtypes (values already rounded to them)."""
    x: torch.Tensor          # leaf, in the case's layout
    weight: torch.Tensor     # (N, K), or (K, N) storage when fan_in_fan_out
    bias: torch.Tensor | None
    A: torch.Tensor          # (r, K)
    B: torch.Tensor          # (N, r)
    scaling: float
    dy: torch.Tensor         # upstream gradient, y's shape and dtype
    case: Case


def make_problem(case: Case, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    dt, adt = DTYPES[case.dtype]
    (K, N), r, M = case.KN, case.r, case.M
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = make_x(rnd(M, K).to(dt), case.layout)
    w = (rnd(N, K) / K ** 0.5).to(dt)
    weight = w.t().contiguous() if case.fan_in_fan_out else w
    bias = (0.5 * rnd(N)).to(dt).requires_grad_() if case.bias else None
    # B random (not PEFT's zeros) and scaling 1.75 (not a power of two): the LoRA term is as large
    # as the base term, so a wrong mask, scale or transpose is an O(1) error.
    A = (rnd(r, K) / K ** 0.5).to(adt).requires_grad_()
    B = (rnd(N, r) / r ** 0.5).to(adt).requires_grad_()
    dy = rnd(*x.shape[:-1], N).to(dt)
    return Problem(x, weight, bias, A, B, 1.75, dy, case)


# ---------------------------------------------------------------------------
# the three computations: each returns {"y", "dx", "dA", "dB"[, "dbias"]}
# ---------------------------------------------------------------------------

def _grads(y, dy, x, A, B, bias) -> dict:
    """y and the gradients of the inputs that require one (frozen inputs must get none)."""
    y.backward(dy)
    out = {"y": y.detach()}
    for name, t in (("dx", x), ("dA", A), ("dB", B), ("dbias", bias)):
        if t is not None and t.requires_grad:
            out[name] = t.grad
        elif t is not None:
            assert t.grad is None, f"{name}: frozen input got a gradient"
    return out


def _leaf(t, dtype=None):
    """A fresh leaf with t's values, strides (detach keeps them) and requires_grad flag."""
    if t is None:
        return None
    d = t.detach() if dtype is None else t.detach().to(dtype)
    return d.requires_grad_(t.requires_grad)


def run_fastlora(pb: Problem, backend: str, **kw) -> dict:
    c = pb.case
    x, bias, A, B = _leaf(pb.x), _leaf(pb.bias), _leaf(pb.A), _leaf(pb.B)
    y = lora_linear(x, pb.weight, bias, A, B, pb.scaling, dropout_p=c.p, training=True,
                    fan_in_fan_out=c.fan_in_fan_out, seed=SEED, backend=backend, **kw)
    return _grads(y, pb.dy, x, A, B, bias)


def problem_mask(pb: Problem, backend: str) -> torch.Tensor:
    """The (M, K) keep mask ``backend`` draws for pb's x with SEED (p = 0: None)."""
    if pb.case.p == 0:
        return None
    K = pb.case.KN[0]
    return mask_of(backend, SEED, pb.x.numel() // K, K, pb.case.p, pb.x.device)


def run_oracle(pb: Problem, backend: str) -> dict:
    """The float64 oracle with ``backend``'s mask."""
    c = pb.case
    x, bias, A, B = (_leaf(t, torch.float64) for t in (pb.x, pb.bias, pb.A, pb.B))
    y = lora_linear_reference(x, pb.weight.double(), bias, A, B, pb.scaling, c.p, SEED, c.fan_in_fan_out,
                              keep=problem_mask(pb, backend))
    return _grads(y, pb.dy.double(), x, A, B, bias)


class MaskDropout(nn.Module):
    """PEFT's lora_dropout replaced by a given keep mask (M, K): x ⊙ keep / (1 − p)."""

    def __init__(self, keep: torch.Tensor | None, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        if self.p == 0:
            return x
        return x * self.keep.reshape(x.shape) / (1 - self.p)


def build_peft(pb: Problem, backend: str, dropout: nn.Module | None = None) -> nn.Module:
    """PEFT lora.Linear with pb's weights, adapters in their dtype, ``dropout`` (default: ``backend``'s mask)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    from transformers.pytorch_utils import Conv1D

    c = pb.case
    (K, N), r, dt = c.KN, c.r, DTYPES[c.dtype][0]
    if c.fan_in_fan_out:                      # GPT-2 Conv1D: weight (K, N), always has a bias
        base = Conv1D(N, K).to(dt)
        base.weight.data.copy_(pb.weight)
        base.bias.data.copy_(pb.bias.detach() if pb.bias is not None else torch.zeros(N))
        # no bias: a frozen zero bias, which adds exactly 0
        base.bias.requires_grad_(pb.bias is not None and pb.bias.requires_grad)
    else:
        base = nn.Linear(K, N, bias=pb.bias is not None, dtype=dt)
        base.weight.data.copy_(pb.weight)
        if pb.bias is not None:
            base.bias.data.copy_(pb.bias.detach())
            base.bias.requires_grad_(pb.bias.requires_grad)
    base.weight.requires_grad_(False)
    alpha = pb.scaling * r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=c.p, fan_in_fan_out=c.fan_in_fan_out)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=c.p,
                       fan_in_fan_out=c.fan_in_fan_out, is_target_conv_1d_layer=c.fan_in_fan_out)
    assert layer.scaling["default"] == pb.scaling
    for mod, w in ((layer.lora_A["default"], pb.A), (layer.lora_B["default"], pb.B)):
        mod.to(w.dtype)
        mod.weight.data.copy_(w.detach())
        mod.weight.requires_grad_(w.requires_grad)
    layer.lora_dropout["default"] = dropout if dropout is not None else MaskDropout(problem_mask(pb, backend), c.p)
    return layer.to(pb.x.device).train()          # the problem's device (tests/kernels/test_gpu.py: CUDA)


def run_peft(pb: Problem, backend: str) -> dict:
    """PEFT in the case's dtypes with ``backend``'s mask."""
    layer = build_peft(pb, backend)
    x = pb.x.detach()
    if pb.case.fan_in_fan_out and pb.case.layout == "3d_t":
        x = x.contiguous()        # transformers' Conv1D calls x.view(-1, K): it cannot take this layout
    x.requires_grad_(pb.x.requires_grad)
    bias = layer.base_layer.bias if pb.bias is not None else None
    return _grads(layer(x), pb.dy, x, layer.lora_A["default"].weight, layer.lora_B["default"].weight, bias)


def abs_problem(pb: Problem) -> Problem:
    """pb with every input (and dy, and s) replaced by its absolute value: the oracle on it gives,
    for y and every gradient, Σ|terms| of each sum — the scale rounding errors are relative to."""
    ab = lambda t: None if t is None else t.detach().abs().requires_grad_(t.requires_grad)  # noqa: E731
    return Problem(ab(pb.x), pb.weight.abs(), ab(pb.bias), ab(pb.A), ab(pb.B), abs(pb.scaling),
                   pb.dy.abs(), pb.case)


def check_parity(pb: Problem, got: dict, backend: str, oracle: dict | None = None, peft: dict | None = None) -> None:
    """Every output and gradient of ``got`` (fastlora on ``backend``): PEFT agrees with the oracle (both with
    that backend's mask); fastlora within the idiom of both. Tolerances scale with Σ|terms| (abs_problem),
    not with the possibly cancelled result."""
    oracle = oracle if oracle is not None else run_oracle(pb, backend)
    peft = peft if peft is not None else run_peft(pb, backend)
    scale = run_oracle(abs_problem(pb), backend)
    assert set(got) == set(oracle) == set(peft), (set(got), set(oracle), set(peft))
    errors = []
    for name in oracle:                    # every output checked; all failures reported together
        try:
            assert_baseline_sane(f"PEFT {name}", peft[name], oracle[name], scale=scale[name])
            assert_close(name, got[name], oracle[name], peft[name], scale=scale[name])
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------

FACTORS = {
    "dtype": list(DTYPES),
    "r": [1, 3, 8, 16, 64],
    "M": [0, 1, 7, 33, 129],
    "layout": list(LAYOUTS),
    "KN": [(20, 36), (33, 17), (72, 50)],
    "bias": [True, False],
    "fan_in_fan_out": [False, True],
    "p": [0.0, 0.1],
}


def _valid(row: dict) -> bool:
    return "layout" not in row or "M" not in row or layout_ok(row["layout"], row["M"])


def pairwise(factors: dict, valid) -> list[dict]:
    """Greedy pairwise covering design: every valid pair of levels of two factors is in some row.

    Deterministic: start each row from the first uncovered pair, then give every other factor
    the level that covers the most still-uncovered pairs (first level on ties).
    """
    names = list(factors)
    uncovered = {((a, u), (b, v)) for a, b in itertools.combinations(names, 2)
                 for u in factors[a] for v in factors[b] if valid({a: u, b: v})}
    rows = []
    while uncovered:
        (a, u), (b, v) = min(uncovered, key=lambda pr: (names.index(pr[0][0]), names.index(pr[1][0]),
                                                         factors[pr[0][0]].index(pr[0][1]),
                                                         factors[pr[1][0]].index(pr[1][1])))
        row = {a: u, b: v}
        for f in names:
            if f in row:
                continue
            gain = lambda lv: sum(((g, row[g]), (f, lv)) in uncovered or ((f, lv), (g, row[g])) in uncovered  # noqa: E731
                                  for g in row)
            row[f] = max((lv for lv in factors[f] if valid({**row, f: lv})), key=gain)
        uncovered -= {((g, row[g]), (h, row[h])) for g, h in itertools.combinations(names, 2)}
        rows.append(row)
    return rows


PAIRWISE = [Case(**row) for row in pairwise(FACTORS, _valid)]
SWEEPS = list(dict.fromkeys(
    [Case(r=r) for r in FACTORS["r"]] + [Case(M=M, layout="contig") for M in FACTORS["M"]]
    + [Case(dtype=d) for d in DTYPES] + [Case(layout=lay) for lay in LAYOUTS]))


def test_pairwise_design_covers_every_pair():
    """The design above is what it claims: every valid pair of levels appears in some case."""
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for u, v in itertools.product(FACTORS[a], FACTORS[b]):
            if _valid({a: u, b: v}):
                assert any(getattr(c, a) == u and getattr(c, b) == v for c in PAIRWISE), (a, u, b, v)
    assert all(layout_ok(c.layout, c.M) for c in PAIRWISE + SWEEPS)


def test_layouts_are_what_they_claim():
    vals = torch.randn(33, 20)
    for layout in LAYOUTS:
        x = make_x(vals, layout)
        assert x.is_leaf and torch.equal(x.reshape(-1, 20), vals), layout
    assert not make_x(vals, "slice").is_contiguous() and not make_x(vals, "t").is_contiguous()
    with pytest.raises(RuntimeError):
        make_x(vals, "3d_t").view(-1, 20)     # leading dims cannot be collapsed without a copy


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: c.id)
def test_parity_pairwise(case, backend):
    pb = make_problem(case)
    check_parity(pb, run_fastlora(pb, backend), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWEEPS, ids=lambda c: c.id)
def test_parity_sweep(case, backend):
    pb = make_problem(case)
    check_parity(pb, run_fastlora(pb, backend), backend)
