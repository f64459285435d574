"""DoRA forward + backward on CPU: fastlora.dora_linear vs PEFT's DoRA layer and vs fastlora's own LoRA.

    python -m benchmarks.bench_dora                       # d 2048, 512 tokens, r 16, dropout 0, 1 thread, fp32

One layer (nn.Linear(d, d) with bias, W0 frozen, x requires grad as in the middle of a network), timed as
y = layer(x); y.backward(g). Providers, run interleaved (each round runs every provider once, in a rotated order,
so a slow spell of the machine hits all of them):

    base            F.linear (the frozen layer alone)
    peft_lora       PEFT lora.Linear (use_dora=False)
    peft_dora       PEFT lora.Linear (use_dora=True): builds B·A through an identity matrix and W0 + s·B·A (N×K)
    fastlora_lora   fastlora.lora_linear, pure-torch backend
    fastlora_dora   fastlora.dora_linear, pure-torch backend (same tensors as peft_dora)

Writes <out>/dora_cpu.csv (per provider: median / p20 / p80 ms) and <out>/dora_ratios_cpu.csv (per pair: median
of the per-round ratios, their geometric mean and 95% interval). Before timing, fastlora's DoRA output and
gradients are checked against PEFT's (relative 1e-4 in fp32): a fast wrong answer is not a result.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common

PAIRS = (("fastlora_dora", "peft_dora"), ("fastlora_dora", "fastlora_lora"), ("peft_dora", "peft_lora"),
         ("fastlora_lora", "base"))
RATIO_COLUMNS = ("pair", "median_ratio", "geomean_ratio", "ci95_lo", "ci95_hi", "rounds", "shape", "mode",
                 "device", "dtype", "versions", "timestamp")


def build(d: int, r: int, dropout: float, seed: int = 0):
    """(PEFT DoRA model, PEFT LoRA model) on the same nn.Linear(d, d) weights; B ≠ 0, m ≠ ‖W0 + s·B·A‖."""
    import warnings

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    lin = nn.Linear(d, d)
    models = []
    for dora in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(nn.Sequential(copy.deepcopy(lin)),
                                LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=dora,
                                           target_modules=["0"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    nn.init.normal_(p, std=0.02)
                if "lora_magnitude_vector" in n:
                    p.mul_(1.1)
        models.append(pm)
    return models


def providers(d: int, r: int, tokens: int, dropout: float):
    """name -> (callable running one forward + backward, the tensors whose .grad it fills)."""
    import fastlora
    from fastlora.ops.dora import dora_linear
    peft_dora, peft_lora = build(d, r, dropout)
    layer = peft_dora.base_model.model[0]
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    s = layer.scaling["default"]
    torch.manual_seed(1)
    x = torch.randn(tokens, d, requires_grad=True)
    g = torch.randn(tokens, d)

    def step(fn):
        def run():
            fn().backward(g)
        return run
    table = {
        "base": step(lambda: F.linear(x, W, b)),
        "peft_lora": step(lambda: peft_lora(x)),
        "peft_dora": step(lambda: peft_dora(x)),
        "fastlora_lora": step(lambda: fastlora.lora_linear(x, W, b, A, B, s, dropout, True, backend="torch")),
        "fastlora_dora": step(lambda: dora_linear(x, W, b, A, B, m, s, dropout, True, backend="torch")),
    }
    params = [x, A, B, m] + [p for p in peft_lora.parameters() if p.requires_grad]
    return table, params, (peft_dora, x, g, W, b, A, B, m, s)


def check(peft_dora, x, g, W, b, A, B, m, s, dropout) -> None:
    """fastlora's DoRA output and gradients vs PEFT's (no dropout: the masks would differ)."""
    from fastlora.ops.dora import dora_linear
    if dropout:
        return
    outs = []
    for fn in (lambda xx: peft_dora(xx), lambda xx: dora_linear(xx, W, b, A, B, m, s, 0.0, True, backend="torch")):
        xx = x.detach().clone().requires_grad_(True)
        for p in (A, B, m):
            p.grad = None
        y = fn(xx)
        y.backward(g)
        outs.append([y.detach(), xx.grad, A.grad.clone(), B.grad.clone(), m.grad.clone()])
    for name, a, e in zip(("y", "dx", "dA", "dB", "dm"), outs[1], outs[0]):
        err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        if not err <= 1e-4:
            raise AssertionError(f"fastlora DoRA {name} differs from PEFT's by {err:.3g} (relative)")


def run(d=2048, tokens=512, r=16, dropout=0.0, rounds=20, warmup=3, threads=1, progress=print):
    torch.set_num_threads(threads)
    table, params, chk = providers(d, r, tokens, dropout)
    check(*chk, dropout)
    names = list(table)
    times = {n: [] for n in names}
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            table[n]()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[n].append(dt)
        if progress and i >= warmup:
            progress(f"round {i - warmup + 1}/{rounds}: " + " ".join(f"{n} {times[n][-1]:.1f}" for n in names))
    return times


def rows(times, d, tokens, r, dropout):
    dev, ver, ts = common.device_name("cpu"), common.versions(), common.timestamp()
    shape, mode = f"M{tokens} d{d} r{r}", f"fwd+bwd p={dropout}"
    per = [dict(kernel="dora_linear", provider=n, mode=mode, shape=shape,
                median_ms=round(statistics.median(t), 4), p20_ms=round(common.quantile(t, 0.2), 4),
                p80_ms=round(common.quantile(t, 0.8), 4), rounds=len(t), device=dev, dtype="float32",
                versions=ver, timestamp=ts) for n, t in times.items()]
    ratios = []
    for a, b in PAIRS:
        rs = [x / y for x, y in zip(times[a], times[b])]
        gm, lo, hi = common.ratio_interval(rs)
        ratios.append(dict(pair=f"{a}/{b}", median_ratio=round(statistics.median(rs), 4),
                           geomean_ratio=round(gm, 4), ci95_lo=round(lo, 4), ci95_hi=round(hi, 4), rounds=len(rs),
                           shape=shape, mode=mode, device=dev, dtype="float32", versions=ver, timestamp=ts))
    return per, ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_dora", description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    for name in ("d", "tokens", "r", "rounds", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    times = run(a.d, a.tokens, a.r, a.dropout, a.rounds, a.warmup, a.threads)
    per, ratios = rows(times, a.d, a.tokens, a.r, a.dropout)
    out = common.output_dir(a.out_dir)
    p1 = common.write_csv(out / "dora_cpu.csv", common.MICRO_COLUMNS, per)
    p2 = common.write_csv(out / "dora_ratios_cpu.csv", RATIO_COLUMNS, ratios)
    for row in per:
        print(f"{row['provider']:<14} median {row['median_ms']:9.2f} ms  "
              f"(p20 {row['p20_ms']:.2f}, p80 {row['p80_ms']:.2f})")
    for row in ratios:
        print(f"{row['pair']:<28} median ratio {row['median_ratio']:.3f}  geomean {row['geomean_ratio']:.3f} "
              f"[{row['ci95_lo']:.3f}, {row['ci95_hi']:.3f}]")
    print(f"wrote {p1} and {p2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
