"""QLoRA layer timing: one 4-bit (NF4, double-quant) LoRA layer, forward + backward, fastlora vs PEFT.

    python -m benchmarks.bench_qlora                       # CPU defaults below; CSV in benchmarks/out/
    python -m benchmarks.bench_qlora --trials 30 --d 2048 --tokens 512 --r 16 --dropout 0.1 --threads 1
    python -m benchmarks.bench_qlora --components          # + median ms of the pieces (dequantize, GEMM, masks)

Both sides are PEFT's lora.bnb.Linear4bit over a bitsandbytes Linear4bit quantized from the same
weight (so the same NF4 bytes); "fastlora" is that layer after fastlora.patch (bitsandbytes
dequantizes, then the fused LoRA op; dequantized again in backward), "peft" is it unpatched
(bitsandbytes' matmul_4bit + PEFT's adapter matmuls). One step: y = layer(x); y.backward(g), x
requiring grad (an inner layer), train mode, LoRA dropout active.

Trials are interleaved (the order alternates each trial) and each trial gives one paired ratio
fastlora / peft; the CSV has both medians and the ratio's geometric mean with its 95% interval
(benchmarks.common.ratio_interval). Not a test: nothing here asserts a speed.

Run it without TRITON_INTERPRET (the interpreter would time Triton's CPU emulation) and without
FASTLORA_BACKEND: on CPU fastlora then runs its torch backend, what a CPU user gets.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from benchmarks import common

COLUMNS = ("kernel", "provider", "mode", "shape", "median_ms", "p20_ms", "p80_ms", "rounds",
           "ratio_to_peft", "ratio_lo95", "ratio_hi95", "device", "dtype", "versions", "timestamp")


def build(d: int, r: int, dropout: float, dtype: torch.dtype, seed: int = 0):
    """A PEFT lora.bnb.Linear4bit (d x d, no bias, r, alpha 2r) over a freshly quantized NF4 base."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    w = torch.randn(d, d) * d ** -0.5
    base = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True)
    wrap = nn.Sequential()
    wrap.add_module("lin", base.to("cpu"))                    # bnb quantizes on the move to a device
    wrap.is_loaded_in_4bit = True                              # PEFT's bnb dispatch reads this
    pm = get_peft_model(wrap, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["lin"]))
    with torch.no_grad():
        nn.init.normal_(pm.base_model.model.lin.lora_B["default"].weight, std=0.02)
    return pm.train()


def step(model, x, g):
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).backward(g)


def components(model, x, p: float, trials: int) -> dict[str, float]:
    """Median ms of the pieces the two sides differ in or share, on the benchmark's shapes."""
    from fastlora.ops import qlora
    from fastlora.core.dropout import draw_packed
    base = model.base_model.model.lin.get_base_layer()
    w = qlora.dequantize(base, x.dtype)
    M, K = x.shape

    pieces = {"bnb dequantize_4bit": lambda: qlora.dequantize(base, x.dtype),
              "base GEMM x·Wᵀ": lambda: x.detach() @ w.t(),
              "fastlora dropout mask (torch.rand, bit-packed)": lambda: draw_packed(None, M, K, p, x.dtype),
              "torch dropout (bernoulli, PEFT's nn.Dropout)": lambda: torch.nn.functional.dropout(x.detach(), p)}
    return {k: common.quantile(common.time_ms(fn, "cpu", trials, 1), 0.5) for k, fn in pieces.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the layer's compute dtype (bnb_4bit_compute_dtype) and x's dtype")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--components", action="store_true",
                    help="also print the median time of the dequantization, the base GEMM and both dropout masks")
    common.add_out_dir_option(ap)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("FASTLORA_BACKEND"):
        raise SystemExit("bench_qlora: unset TRITON_INTERPRET and FASTLORA_BACKEND (it times fastlora's "
                         "CPU path, the torch backend)")
    import bitsandbytes as bnb

    import fastlora
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fast, peft = build(args.d, args.r, args.dropout, dtype), build(args.d, args.r, args.dropout, dtype)
    rep = fastlora.patch(fast)
    assert len(rep.patched) == 1, rep
    x = torch.randn(args.tokens, args.d, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.d, dtype=dtype)
    runs = {"fastlora": lambda: step(fast, x, g), "peft": lambda: step(peft, x, g)}
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in runs}
    for t in range(args.trials):
        for name in (("fastlora", "peft") if t % 2 == 0 else ("peft", "fastlora")):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratio, lo, hi = common.ratio_interval([a / b for a, b in zip(times["fastlora"], times["peft"])])
    shape = f"d={args.d} tokens={args.tokens} r={args.r} p={args.dropout}"
    versions = common.versions() + f" bitsandbytes={bnb.__version__}"
    rows = []
    for name, ts in times.items():
        rows.append(dict(kernel="qlora_4bit", provider=name, mode="fwd+bwd", shape=shape,
                         median_ms=round(common.quantile(ts, 0.5), 3), p20_ms=round(common.quantile(ts, 0.2), 3),
                         p80_ms=round(common.quantile(ts, 0.8), 3), rounds=len(ts),
                         ratio_to_peft=round(ratio, 4) if name == "fastlora" else 1.0,
                         ratio_lo95=round(lo, 4) if name == "fastlora" else "",
                         ratio_hi95=round(hi, 4) if name == "fastlora" else "",
                         device=common.device_name("cpu"), dtype=args.dtype, versions=versions,
                         timestamp=common.timestamp()))
    name = f"qlora_4bit_p{args.dropout:g}_{common.device_tag('cpu')}.csv"
    path = common.write_csv(common.output_dir(args.out_dir) / name, COLUMNS, rows)
    for row in rows:
        print(f"{row['provider']:9s} median {row['median_ms']:9.2f} ms  (p20 {row['p20_ms']:.2f}, "
              f"p80 {row['p80_ms']:.2f}, {row['rounds']} trials)")
    print(f"fastlora / peft: {ratio:.3f} (95% {lo:.3f} .. {hi:.3f}), {shape}, {args.dtype}, "
          f"{common.device_name('cpu')}")
    print(f"wrote {path}")
    if args.components:
        for k, ms in components(fast, x, args.dropout or 0.1, max(5, args.trials // 4)).items():
            print(f"  {k:45s} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
