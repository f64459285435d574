"""GPU probe: the first thing a GPU day measures (step 1 of benchmarks/run_gpu.sh), one CSV.

    python -m benchmarks.gpu_probe                        # CUDA: d 4096 and 8192, 4096 tokens, r 16, bf16
    python -m benchmarks.gpu_probe --device cpu --dims 64 --tokens 32 --dtype float32   # the dry run's smoke

For each d, one LoRA layer (W0 (d, d), bias, A (r, d), B (d, r), s = 2; benchmarks.bench_linear.Layer) timed as
  fwd       (eval, no grad)  base F.linear · fastlora.lora_linear · the cuBLAS composite addmm + x·Aᵀ + addmm_ · PEFT
  fwd+bwd   (x requires grad, W0 frozen; p ∈ {0, 0.1})  base = F.linear forward + backward (the two base GEMMs) ·
            fastlora · PEFT
each both eager (host launch overhead included) and replayed from a CUDA graph (the kernels' own time; a case
that cannot be captured gets an empty graph_ms and its reason in the log). Medians from triton's do_bench on
CUDA; on CPU, medians of wall-clock trials and no graph column (the dry run checks the code path, no timing
claims). Printed: the ratios the project's targets are about (fastlora / base forward, fastlora / PEFT
forward+backward, fastlora / the two base GEMMs), the launch configs the policy chose, and the profiler's
per-kernel table of fastlora's forward+backward at p 0.1.
Writes <out>/gpu_probe_<device tag>[_<suffix>].csv (run_gpu.sh re-probes with --suffix tuned after tuning).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from . import common
from .bench_linear import Layer

COLUMNS = ("d", "tokens", "r", "mode", "p", "provider", "eager_ms", "graph_ms", "device", "dtype", "versions",
           "timestamp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_ms(fn, device: torch.device, trials: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    return common.quantile(common.time_ms(fn, device, trials, warmup=2), 0.5)


def graph_ms(fn, device: torch.device) -> tuple[float, str]:
    """(median ms of fn replayed from a CUDA graph, "") or (nan, why not). Warm-up outside the capture."""
    if device.type != "cuda":
        return math.nan, "no CUDA graphs on CPU"
    try:
        g = common.cuda_graph(fn, grad=True)     # grad on: the forward+backward cases are captured whole
    except Exception as e:                    # noqa: BLE001 - a case that cannot be captured is reported, not fatal
        torch.cuda.synchronize()
        return math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return median_ms(g.replay, device, 0), ""


def cases(layer: Layer, p: float):
    """{(mode, provider): callable} for one layer; fwd only at p = 0 (dropout is off in eval)."""
    out = {}
    if p == 0.0:
        for prov in ("base", "fastlora", "composite", "peft"):
            def fwd(prov=prov):
                with torch.no_grad():
                    layer.call(prov, layer.x, training=False)
            out[("fwd", prov)] = fwd
    x = layer.x.clone().requires_grad_(True)
    for prov in ("base", "fastlora", "peft"):
        if prov == "base" and p > 0:
            continue                          # the base layer has no dropout: its row is the p = 0 one
        def fwd_bwd(prov=prov):
            layer.call(prov, x, training=True).backward(layer.dy)
        out[("fwd+bwd", prov)] = fwd_bwd
    return out


def probe(d: int, tokens: int, r: int, dtype: torch.dtype, device: torch.device, trials: int) -> list[dict]:
    rows, vers, stamp = [], common.versions(), common.timestamp()
    for p in (0.0, 0.1):
        layer = Layer(tokens, d, r, p, device=device, dtype=dtype)
        for (mode, prov), fn in cases(layer, p).items():
            eager = median_ms(fn, device, trials)
            graph, why = graph_ms(fn, device)
            if why and device.type == "cuda":
                print(f"  d{d} {mode} p={p} {prov}: not captured ({why})")
            rows.append(dict(d=d, tokens=tokens, r=r, mode=mode, p=p, provider=prov, eager_ms=f"{eager:.4f}",
                             graph_ms="" if math.isnan(graph) else f"{graph:.4f}",
                             device=common.device_name(device), dtype=str(dtype).replace("torch.", ""),
                             versions=vers, timestamp=stamp))
    return rows


def ratios(rows: list[dict], d: int) -> list[str]:
    """The target ratios of one d, from the graph column where there is one, else the eager column."""
    t = {(r["mode"], float(r["p"]), r["provider"]): float(r["graph_ms"] or r["eager_ms"]) for r in rows
         if int(r["d"]) == d}
    col = "graph" if any(r["graph_ms"] for r in rows) else "eager"
    lines = [f"d {d} ({col}): fwd fastlora/base {t['fwd', 0.0, 'fastlora'] / t['fwd', 0.0, 'base']:.3f}, "
             f"composite/base {t['fwd', 0.0, 'composite'] / t['fwd', 0.0, 'base']:.3f}, "
             f"peft/base {t['fwd', 0.0, 'peft'] / t['fwd', 0.0, 'base']:.3f}"]
    for p in (0.0, 0.1):
        lines.append(f"d {d} ({col}): fwd+bwd p={p} fastlora/peft "
                     f"{t['fwd+bwd', p, 'fastlora'] / t['fwd+bwd', p, 'peft']:.3f}, fastlora/two base GEMMs "
                     f"{t['fwd+bwd', p, 'fastlora'] / t['fwd+bwd', 0.0, 'base']:.3f}")
    return lines


def show_configs(d: int, tokens: int, r: int, dtype: torch.dtype, device: torch.device) -> None:
    """The launch configs the policy picks for this shape (fixed rule, or $FASTLORA_TUNE_CACHE)."""
    from fastlora.kernels import policy
    prec, lprec = policy.fp32_precision(dtype), policy.lora_precision(dtype, dtype)
    print(f"  configs d{d}:", {k: policy.config(k, dtype, pr, tokens, d, r, device) for k, pr in
                               (("shrink", lprec), ("expand", prec), ("dsdb", lprec), ("dx", lprec))})


def profile_table(d: int, tokens: int, r: int, dtype: torch.dtype, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile
    layer = Layer(tokens, d, r, 0.1, device=device, dtype=dtype)
    fn = cases(layer, 0.1)["fwd+bwd", "fastlora"]
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda[:i] or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dims", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--trials", type=int, default=5, help="CPU trials per case (CUDA: do_bench decides)")
    p.add_argument("--suffix", default="", help="appended to the CSV name (e.g. 'tuned')")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel profiler table")
    common.add_out_dir_option(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype]
    if min(a.dims) < 1 or a.tokens < 1 or a.r < 1:
        parser().error("--dims, --tokens and --r must be >= 1")
    print(f"gpu_probe on {common.device_name(device)}, {a.dtype}, tokens {a.tokens}, r {a.r}; {common.versions()}")
    rows = []
    for d in a.dims:
        rows += probe(d, a.tokens, a.r, dtype, device, a.trials)
        for line in ratios(rows, d):
            print(" ", line)
        if device.type == "cuda":
            show_configs(d, a.tokens, a.r, dtype, device)
    name = f"gpu_probe_{common.device_tag(device)}{'_' + a.suffix if a.suffix else ''}.csv"
    path = common.write_csv(common.output_dir(a.out_dir) / name, COLUMNS, rows)
    print(f"wrote {path}")
    if device.type == "cuda" and not a.no_profile:
        profile_table(a.dims[0], a.tokens, a.r, dtype, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
