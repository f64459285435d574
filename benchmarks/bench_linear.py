"""Microbenchmark: one LoRA linear layer, forward and forward+backward, fastlora vs the alternatives.

    python -m pytest benchmarks/bench_linear.py --benchmark-only -q     # CSV + PNG in benchmarks/out/
    python -m benchmarks.bench_linear [--threads N]                     # paired ratios: forward vs base GEMM, fwd+bwd vs PEFT

Providers (all with the same W0 (N, K), bias (N,), A (r, K), B (N, r), s = alpha/r = 2):
    base       F.linear(x, W0, bias) — the base GEMM alone, the floor (no LoRA at all)
    fastlora   fastlora.lora_linear (on CPU without TRITON_INTERPRET: its fused pure-torch path)
    peft       peft.tuners.lora.Linear around an nn.Linear
    loralib    loralib.Linear(merge_weights=False), so eval mode stays unmerged
    composite  addmm(bias, x, W0ᵀ) then y.addmm_(dropout(x)·Aᵀ, Bᵀ, alpha=s)
Modes:
    fwd        eval, torch.no_grad (dropout inactive, so only p = 0)
    fwd+bwd    training with x requiring grad (a layer inside a network), W0 and bias frozen;
               backward from a fixed dY; p ∈ {0, 0.1}
Shapes: CPU d = 2048, r = 16, 512 tokens, float32; CUDA (only when available) d ∈ {4096, 8192},
r = 16, 4096 tokens, bfloat16.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(4096, 4096, 16), (4096, 8192, 16)] if CUDA else [(512, 2048, 16)]     # (tokens M, d, r)
ROUNDS = int(os.environ.get("FASTLORA_BENCH_ROUNDS", 100 if CUDA else 20))
PROVIDERS = ["base", "fastlora", "peft", "loralib", "composite"]
ALPHA = 32


class Layer:
    """Every provider's callable over the same tensors."""

    def __init__(self, M, d, r, p, device=DEVICE, dtype=DTYPE):
        DEVICE, DTYPE = torch.device(device), dtype   # noqa: N806 - the module defaults, overridable (gpu_probe)
        self.device = DEVICE
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(DEVICE, DTYPE)   # noqa: E731
        self.W, self.bias, self.A, self.B = mk(d, d), mk(d), mk(r, d), mk(d, r)
        self.s, self.p = ALPHA / r, p
        self.x = torch.randn(M, d, generator=g).to(DEVICE, DTYPE)
        self.dy = torch.randn(M, d, generator=g).to(DEVICE, DTYPE)
        base = nn.Linear(d, d, device=DEVICE, dtype=DTYPE)
        base.weight.data.copy_(self.W)
        base.bias.data.copy_(self.bias)
        base.requires_grad_(False)
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        self.peft = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p), r=r,
                               lora_alpha=ALPHA, lora_dropout=p).to(DEVICE, DTYPE)
        import loralib
        self.loralib = loralib.Linear(d, d, r=r, lora_alpha=ALPHA, lora_dropout=p, merge_weights=False)
        self.loralib.to(DEVICE, DTYPE)
        with torch.no_grad():
            for mod_A, mod_B in ((self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight),
                                 (self.loralib.lora_A, self.loralib.lora_B)):
                mod_A.copy_(self.A)
                mod_B.copy_(self.B)
            self.loralib.weight.copy_(self.W)
            self.loralib.bias.copy_(self.bias)
        self.loralib.weight.requires_grad_(False)
        self.loralib.bias.requires_grad_(False)
        self.A.requires_grad_(True)
        self.B.requires_grad_(True)

    def call(self, provider, x, training):
        if provider == "base":
            return F.linear(x, self.W, self.bias)
        if provider == "fastlora":
            return fastlora.lora_linear(x, self.W, self.bias, self.A, self.B, self.s, self.p, training)
        if provider in ("peft", "loralib"):
            mod = getattr(self, provider)
            if mod.training != training:
                mod.train(training)          # loralib's train() returns None: no chaining
            return mod(x)
        if provider == "composite":
            y = torch.addmm(self.bias, x, self.W.t())
            return y.addmm_(F.dropout(x, self.p, training) @ self.A.t(), self.B.t(), alpha=self.s)
        raise ValueError(provider)

    def params(self, provider):
        return {"fastlora": [self.A, self.B], "composite": [self.A, self.B],
                "peft": [self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight],
                "loralib": [self.loralib.lora_A, self.loralib.lora_B]}.get(provider, [])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M,d,r", SHAPES, ids=lambda v: str(v))
def test_forward(benchmark, record, provider, M, d, r):
    layer = Layer(M, d, r, 0.0)
    if provider != "base":                  # every provider computes the same layer (float64 check)
        with torch.no_grad():
            y = layer.call(provider, layer.x, training=False).double()
        x64 = layer.x.double()
        ref = torch.addmm(layer.bias.double(), x64, layer.W.double().t()) + \
            layer.s * (x64 @ layer.A.detach().double().t()) @ layer.B.detach().double().t()
        tol = 1e-4 if DTYPE == torch.float32 else 3e-2          # relative to max|y|: rounding of a K-sum
        assert (y - ref).abs().max() <= tol * ref.abs().max(), provider

    def fn():
        with torch.no_grad():
            layer.call(provider, layer.x, training=False)
        _sync()

    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    record(benchmark, kernel="lora_linear", provider=provider, mode="fwd", shape=f"M{M} d{d} r{r}",
           dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,d,r", SHAPES, ids=lambda v: str(v))
def test_forward_backward(benchmark, record, provider, p, M, d, r):
    if provider == "base" and p > 0:
        pytest.skip("the base GEMM has no dropout: its fwd+bwd row is the p = 0 one")
    layer = Layer(M, d, r, p)
    x = layer.x.clone().requires_grad_(True)
    params = layer.params(provider)

    def fn():
        x.grad = None
        for t in params:
            t.grad = None
        layer.call(provider, x, training=True).backward(layer.dy)
        _sync()

    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    record(benchmark, kernel="lora_linear", provider=provider, mode=f"fwd+bwd p={p}", shape=f"M{M} d{d} r{r}",
           dtype=DTYPE, device=DEVICE)


# ----------------------------------------------------------------------------- paired ratios
# python -m benchmarks.bench_linear: the project's targets are ratios, and a shared CPU drifts by tens of
# percent over a run. Here each round times both providers back to back (in random order) and the
# ratio is taken per round, so a slow spell cancels; the median ratio and its p20–p80 are reported.

def paired_ratio(layer: Layer, num: str, den: str, mode: str, rounds: int) -> list[float]:
    """Per-round time(num) / time(den); mode "fwd" (eval, no grad) or "fwd+bwd" (training)."""
    import random
    import time
    x = layer.x.clone().requires_grad_(mode != "fwd")

    def once(provider):
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                layer.call(provider, layer.x, training=False)
        else:
            x.grad = None
            for t in layer.params(provider):
                t.grad = None
            layer.call(provider, x, training=True).backward(layer.dy)
        _sync()
        return time.perf_counter() - t0

    for p in (num, den):                      # warm-up
        once(p), once(p)
    rng, ratios = random.Random(0), []
    for _ in range(rounds):
        order = [num, den]
        rng.shuffle(order)
        t = {p: once(p) for p in order}
        ratios.append(t[num] / t[den])
    return ratios


def main(argv=None) -> int:
    import argparse
    from benchmarks import common
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_linear",
                                 description="paired ratios: fastlora forward vs the base GEMM, forward+backward vs PEFT")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    if a.threads is not None:
        if a.threads < 1:
            ap.error(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    checks = [("fwd", 0.0, "fastlora", "base"), ("fwd", 0.0, "peft", "base"),
              ("fwd+bwd", 0.1, "fastlora", "peft"), ("fwd+bwd", 0.0, "fastlora", "peft")]
    rows = []
    print(f"paired ratios on {common.device_name(DEVICE)}, {DTYPE}, {a.rounds} rounds")
    for M, d, r in SHAPES:
        for mode, p, num, den in checks:
            rs = paired_ratio(Layer(M, d, r, p), num, den, mode, a.rounds)
            med, lo, hi = (common.quantile(rs, q) for q in (0.5, 0.2, 0.8))
            print(f"  M{M} d{d} r{r} {mode:<8} p={p}: {num}/{den} = {med:.3f} (p20 {lo:.3f}, p80 {hi:.3f})")
            rows.append(dict(kernel="lora_linear_ratio", provider=f"{num}/{den}", mode=f"{mode} p={p}",
                             shape=f"M{M} d{d} r{r}", median_ms=f"{med:.4f}", p20_ms=f"{lo:.4f}",
                             p80_ms=f"{hi:.4f}", rounds=a.rounds, device=common.device_name(DEVICE),
                             dtype=str(DTYPE).replace("torch.", ""), versions=common.versions(),
                             timestamp=common.timestamp()))
    path = common.write_csv(f"{common.output_dir()}/lora_linear_ratios_{common.device_tag(DEVICE)}.csv", common.MICRO_COLUMNS, rows)
    print(f"wrote {path} (the *_ms columns hold unitless ratios here)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
