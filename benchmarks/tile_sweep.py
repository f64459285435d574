"""Tile sweep for the fused LoRA kernels on a GPU: every candidate config timed on its own, next to cuBLAS.

    TRITON_INTERPRET=0 python -m benchmarks.tile_sweep [--d 4096 8192] [--tokens 4096] [--r 16] [--out CSV]

The autotuner keeps only its winner; tuning needs the whole table (how far the best tile is from cuBLAS, which
tiles are close). For each candidate the autotuned kernel is given that one config (``configs = [cfg]``,
cache cleared), run once and checked against float64 (a config that computes a wrong answer is reported,
never timed), then timed with triton.testing.do_bench:
  fwd  the two-launch forward (shrink + GEMM with the LoRA epilogue), eval, bf16, against F.linear;
  dx   the backward (dS/dB kernel + the dx/dA kernel under test), dropout 0 and 0.1, against cuBLAS's dY·W.
Candidates include tiles the shipped lists leave out because they spill on sm_80 or with some flags
(python -m fastlora.inspect): on an sm_90 part their speed is what decides whether to ship them per target.
A config that does not compile or launch is listed with its error. Needs CUDA; under TRITON_INTERPRET=1 it
runs at toy sizes (tests/test_benchmarks.py checks it that way).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

from benchmarks import common
from fastlora.dropout import keep_mask
from fastlora.kernels import linear_bwd as lb
from fastlora.kernels import linear_fwd as lf
from fastlora.kernels._common import interpreting

COLUMNS = ("kernel", "config", "shape", "ms", "cublas_ms", "ratio", "tflops", "error", "device", "dtype", "versions",
           "timestamp")


def _cfg(**kw):
    warps, stages = kw.pop("w"), kw.pop("s")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def fwd_candidates():
    if interpreting():
        return [_cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, w=1, s=1),
                _cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, w=1, s=1)]
    tiles = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
             (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, w=w, s=s) for m, n, k, w, s in tiles]


def dx_candidates():
    if interpreting():
        return [_cfg(BLOCK_K=16, BLOCK_N=16, GROUP_M=2, w=1, s=1), _cfg(BLOCK_K=32, BLOCK_N=16, GROUP_M=2, w=1, s=1)]
    tiles = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 4), (256, 64, 8, 3), (256, 32, 8, 3), (128, 64, 4, 3)]
    return [_cfg(BLOCK_K=k, BLOCK_N=n, GROUP_M=8, w=w, s=s) for k, n, w, s in tiles]


def _name(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"


def _bench(fn):
    if interpreting():
        fn()
        return float("nan")
    from triton.testing import do_bench
    return do_bench(fn)


def _with_config(kernel, cfg, fn):
    """Run fn with the autotuned ``kernel`` restricted to ``cfg``; restores its configs afterwards."""
    saved, saved_prune = kernel.configs, getattr(kernel, "early_config_prune", None)
    kernel.configs, kernel.early_config_prune = [cfg], None
    kernel.cache.clear()
    try:
        return fn()
    finally:
        kernel.configs, kernel.early_config_prune = saved, saved_prune
        kernel.cache.clear()


def sweep(d: int, M: int, r: int, device, dtype=torch.bfloat16) -> list[dict]:
    """CSV rows for one width d: every forward and dx candidate at M tokens, rank r (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype)   # noqa: E731
    x, W, b, A, B, dy = mk(M, d), mk(d, d) / d ** 0.5, mk(d), mk(r, d) / d ** 0.5, mk(d, r), mk(M, d)
    scale = torch.tensor(2.0, device=device)
    seed = torch.tensor(7, device=device)
    x64 = x.double()
    y64 = F.linear(x64, W.double(), b.double()) + 2.0 * (x64 @ A.double().t()) @ B.double().t()
    lora_dx64 = 2.0 * (dy.double() @ B.double()) @ A.double()
    shape, rows = f"M{M} d{d} r{r}", []
    flops = 2.0 * M * d * d
    meta = dict(device=common.device_name(device), dtype=str(dtype).replace("torch.", ""),
                versions=common.versions(), timestamp=common.timestamp())
    cublas_fwd = _bench(lambda: F.linear(x, W, b))
    cublas_dx = _bench(lambda: dy @ W)

    def row(kernel, cfg, ms, ref_ms, err=""):
        rows.append(dict(kernel=kernel, config=_name(cfg), shape=shape, ms=f"{ms:.4f}", cublas_ms=f"{ref_ms:.4f}",
                         ratio=f"{ms / ref_ms:.3f}" if ref_ms == ref_ms and ms == ms else "",
                         tflops=f"{flops / ms / 1e9:.0f}" if ms == ms else "", error=err, **meta))

    x3 = lf.x_as_3d(x)
    fwd = lambda: lf._launch("two", *x3, W, b, A, B, scale, seed, 0.0, False, False)[0]   # noqa: E731
    for cfg in fwd_candidates():
        try:
            y = _with_config(lf._gemm, cfg, fwd)
            err = ((y.double() - y64).abs().max() / y64.abs().max()).item()
            if not err < 2e-2:
                row("fwd", cfg, float("nan"), cublas_fwd, f"wrong result: rel. error {err:.2e}")
                continue
            row("fwd", cfg, _with_config(lf._gemm, cfg, lambda: _bench(fwd)), cublas_fwd)
        except Exception as e:                       # compile / launch failure: report, go on
            row("fwd", cfg, float("nan"), cublas_fwd, f"{type(e).__name__}: {str(e)[:200]}")

    S = torch.zeros(M, r, device=device, dtype=torch.float32)
    S.copy_(x.float() @ A.float().t())
    for p in (0.0, 0.1):
        keep = keep_mask(seed, M, d, p, device).double() / (1 - p) if p else 1.0
        dx64 = dy.double() @ W.double() + lora_dx64 * keep

        def bwd(p=p):
            return lb.lora_bwd(dy, x, W, A, B, S, scale, p, seed, False, True, True, True, True, False)[0]
        for cfg in dx_candidates():
            label = f"dx p={p}"
            try:
                dx = _with_config(lb._dx, cfg, bwd)
                err = ((dx.double() - dx64).abs().max() / dx64.abs().max()).item()
                if not err < 2e-2:
                    row(label, cfg, float("nan"), cublas_dx, f"wrong result: rel. error {err:.2e}")
                    continue
                row(label, cfg, _with_config(lb._dx, cfg, lambda: _bench(bwd)), cublas_dx)
            except Exception as e:
                row(label, cfg, float("nan"), cublas_dx, f"{type(e).__name__}: {str(e)[:200]}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tile_sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/tile_sweep_<device>.csv)")
    a = ap.parse_args(argv)
    for name, vals in (("--d", a.d), ("--tokens", [a.tokens]), ("--r", [a.r])):
        if min(vals) < 1:
            ap.error(f"{name} must be >= 1, got {min(vals)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not interpreting():
        ap.error("needs a CUDA device (or TRITON_INTERPRET=1 for a toy-size dry run)")
    rows = [r for d in a.d for r in sweep(d, a.tokens, a.r, device)]
    for r in rows:
        print(f"{r['kernel']:<9} {r['shape']:<16} {r['config']:<55} {r['ms']:>9} ms  cuBLAS {r['cublas_ms']:>8}"
              f"  x{r['ratio']:<6} {r['tflops']:>5} TFLOP/s {r['error']}")
    path = common.write_csv(a.out or f"{common.RESULTS_DIR}/tile_sweep_{common.device_tag(device)}.csv", COLUMNS, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
