"""Turn benchmark CSVs into PNGs.

    python -m benchmarks.plot benchmarks/results/*.csv       # one PNG per CSV, in the output folder
    python -m benchmarks.plot --out-dir benchmarks/results benchmarks/results/*.csv   # redraw the committed PNGs

The PNGs go to the output folder (benchmarks/out/ unless --out-dir or $FASTLORA_BENCH_OUT;
benchmarks.common.output_dir), named after each CSV, so redrawing never overwrites a committed PNG
unless asked. Called from a benchmark (plot_csv), the PNG goes beside the CSV it just wrote.

The CSV kind is recognised from its columns: the paper table (paper_table.py), the
microbenchmarks (bench_*.py: kernel/provider/mode/shape/median…), the memory benchmark
(memory.py) or the traffic model (traffic.py, every figure labelled "model").
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import common  # noqa: E402
from .common import read_csv  # noqa: E402


def _f(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def plot_paper_table(csv_path, png_path) -> Path:
    """Left: measured ms ± std per row, one group per column. Right: ratio to merged with its 95% interval
    (paired trials; older CSVs without the ratio columns: % over merged from the means), measured vs paper."""
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    columns = list(dict.fromkeys(r["column"] for r in rows))
    names = list(dict.fromkeys(r["row"] for r in rows))
    paired = "ratio" in rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        sel = {r["column"]: r for r in rows if r["row"] == name}
        xs = [j + i * w for j in range(len(columns))]
        axes[0].bar(xs, [_f(sel[c]["mean_ms"]) if c in sel else 0 for c in columns], w,
                    yerr=[_f(sel[c]["std_ms"]) if c in sel else 0 for c in columns], capsize=3, label=name)
        if paired:
            ratio = [_f(sel[c]["ratio"]) if c in sel else float("nan") for c in columns]
            lo = [r - _f(sel[c]["ratio_lo"]) if c in sel else 0 for r, c in zip(ratio, columns)]
            hi = [_f(sel[c]["ratio_hi"]) - r if c in sel else 0 for r, c in zip(ratio, columns)]
            axes[1].bar(xs, [r - 1 for r in ratio], w, bottom=1, label=name,
                        yerr=[[0 if v != v else v for v in lo], [0 if v != v else v for v in hi]], capsize=3)
            paper = [1 + _f(sel[c]["paper_overhead_pct"]) / 100 if c in sel else float("nan") for c in columns]
        else:
            axes[1].bar(xs, [_f(sel[c]["overhead_pct"]) if c in sel else 0 for c in columns], w, label=name)
            paper = [_f(sel[c]["paper_overhead_pct"]) if c in sel else float("nan") for c in columns]
        axes[1].scatter(xs, paper, marker="x", color="black", zorder=3,
                        label="paper (RTX8000)" if i == 0 else None)
    labels = [f"decode, batch {r0['batch']}\n(1 token, KV {r0['kv_cache']})" if r0.get("kv_cache")
              else f"batch {r0['batch']} / seq {r0['seq']}"
              for r0 in (next(r for r in rows if r["column"] == c) for c in columns)]
    for ax in axes:
        ax.set_xticks([j + w * (len(names) - 1) / 2 for j in range(len(columns))], labels)
    axes[0].set_ylabel("ms per forward pass / decode step (mean ± std)")
    axes[1].set_ylabel("ratio to merged, paired trials (95% interval)" if paired else "% over merged (base model)")
    axes[1].axhline(1 if paired else 0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"GPT-2 ({r0['n_layer']} layers, d {r0['n_embd']}) forward latency — measured on "
                 f"{r0['device']}, {r0['dtype']}, {r0['trials']} trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def plot_micro(csv_path, png_path) -> Path:
    """One panel per (kernel, mode, shape): median ms per provider, whiskers p20–p80."""
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    panels = list(dict.fromkeys((r["kernel"], r["mode"], r["shape"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4), squeeze=False)
    for ax, (k, m, s) in zip(axes[0], panels):
        sel = [r for r in rows if (r["kernel"], r["mode"], r["shape"]) == (k, m, s)]
        med = [_f(r["median_ms"]) for r in sel]
        lo = [mm - _f(r["p20_ms"]) for mm, r in zip(med, sel)]
        hi = [_f(r["p80_ms"]) - mm for mm, r in zip(med, sel)]
        ax.bar(range(len(sel)), med, yerr=[lo, hi], capsize=3,
               color=["tab:green" if r["provider"] == "fastlora" else "tab:blue" for r in sel])
        ax.set_xticks(range(len(sel)), [r["provider"] for r in sel], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{k} {m}\n{s}", fontsize=8)
        ax.set_ylabel("median ms (p20–p80)")
    fig.suptitle(f"{rows[0]['device']} — {rows[0]['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plot_bars(csv_path, png_path, value: str, label: str, group, bar: str, title: str,
              log: bool = False) -> Path:
    """Generic grouped bar chart: one group per ``group`` value, one bar per ``bar`` value.

    ``group`` is a column name or a tuple of column names (joined into one label).
    """
    rows = read_csv(csv_path)
    if isinstance(group, tuple):
        for r in rows:
            r["_group"] = "\n".join(r[g] for g in group)
        group = "_group"
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    groups = list(dict.fromkeys(r[group] for r in rows))
    bars = list(dict.fromkeys(r[bar] for r in rows))
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.2 * len(groups) * len(bars))), 5))
    if log:
        ax.set_yscale("log")
    w = 0.8 / len(bars)
    for i, b in enumerate(bars):
        sel = {r[group]: r for r in rows if r[bar] == b}
        ax.bar([j + i * w for j in range(len(groups))], [_f(sel[g][value]) if g in sel else 0 for g in groups],
               w, label=b)
    ax.set_xticks([j + w * (len(bars) - 1) / 2 for j in range(len(groups))], groups, rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plot_train_step(csv_path, png_path) -> Path:
    """Left: tokens/s per provider (median, whiskers p20–p80). Right: peak memory (CUDA) or saved-for-backward."""
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    names = [r["provider"] for r in rows]
    colors = ["tab:green" if n == "fastlora" else "tab:blue" for n in names]
    med = [_f(r["median_tok_s"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].bar(names, med, yerr=[[m - _f(r["p20_tok_s"]) for m, r in zip(med, rows)],
                                  [_f(r["p80_tok_s"]) - m for m, r in zip(med, rows)]], capsize=4, color=colors)
    axes[0].set_ylabel("tokens/s per optimizer step (median, p20–p80)")
    f = next((r for r in rows if r["provider"] == "fastlora"), None)
    if f is not None:
        ci = f" [{_f(f['speedup_lo']):.3f}, {_f(f['speedup_hi']):.3f}] (95%)" if f["speedup_lo"] else ""
        axes[0].set_title(f"fastlora tokens/s ÷ PEFT's, paired: {_f(f['speedup_vs_peft']):.3f}x{ci}", fontsize=9)
    cuda = all(r["peak_mib"] not in ("", "n/a") for r in rows)
    key, label = ("peak_mib", "peak MiB (resident + step, CUDA)") if cuda else \
        ("saved_mib", "MiB saved for backward (CPU: no peak statistics)")
    axes[1].bar(names, [_f(r[key]) for r in rows], color=colors)
    axes[1].set_ylabel(label)
    r0 = rows[0]
    fig.suptitle(f"train step: Llama {r0['layers']}L d{r0['hidden']} ff{r0['intermediate']} vocab {r0['vocab']}, "
                 f"batch {r0['batch']}x{r0['seq']}, LoRA r {r0['r']} p {r0['lora_dropout']} — {r0['device']}, "
                 f"{r0['dtype']}, {r0['rounds']} rounds", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plot_csv(csv_path, png_path=None) -> Path:
    """Plot any benchmark CSV, recognised by its columns; the PNG goes beside it by default."""
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    rows = read_csv(csv_path)
    cols = set(rows[0]) if rows else set()
    if {"median_tok_s", "provider"} <= cols:
        return plot_train_step(csv_path, png_path)
    if {"paper_mean_ms", "overhead_pct"} <= cols:
        return plot_paper_table(csv_path, png_path)
    if {"provider", "median_ms", "p20_ms"} <= cols:
        return plot_micro(csv_path, png_path)
    if {"model_time_us", "gpu"} <= cols:
        return plot_bars(csv_path, png_path, "model_time_us", "model: µs per layer", ("gpu", "case"), "impl",
                         "MODEL (not measured): modelled time per layer, Σ roofline + launches", log=True)
    if {"saved_bytes", "provider"} <= cols:
        return plot_bars(csv_path, png_path, "saved_mib", "MiB saved for backward per layer", "case",
                         "provider", f"bytes saved for backward — {rows[0]['device']}")
    raise ValueError(f"{csv_path}: not a benchmark CSV this script knows (columns {sorted(cols)})")


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description="draw the PNG of benchmark CSVs")
    ap.add_argument("csv", nargs="+", help="benchmark CSV files")
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    out = common.output_dir(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in a.csv:
        print(f"wrote {plot_csv(p, out / (Path(p).stem + '.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
