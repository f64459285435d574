"""Reproduce Table 1 of the LoRA paper: inference latency of GPT-2 medium with adapters vs LoRA.

    python -m benchmarks.paper_table                    # CPU: batch 1 / seq 128 and decode, few trials
    python -m benchmarks.paper_table --columns all      # the paper's three columns and decode
    python -m benchmarks.paper_table --device cuda      # CUDA default: full table, 100 trials

Model: transformers GPT2Model built from a GPT2Config (24 layers, d 1024, 16 heads; random
weights, no download; no LM head), eval mode, one forward pass per trial, mean ± std over
trials after warm-up.

Columns: the paper's three (batch x sequence length, one full forward each), and ``decode``: batch 1, one
new token per step on a KV cache of DECODE_CACHE (128) prompt tokens (each row's model runs the prompt once
with use_cache=True; every timed step adds one token, then the cache is cropped back, so every step does the
same work). A trial is the mean of DECODE_STEPS separately timed steps, in ms per token. This is the
latency-bound case where per-op host cost shows: a batch-1 full forward is compute-bound on a CPU (every row
≈ merged there), while a decode step launches the same ops for one token. The paper has no decode column.

Rows:

    merged     Fine-Tune / LoRA merged into W: the base model itself
    AdapterL   one adapter per block after the MLP, with a LayerNorm  (benchmarks/adapters.py)
    AdapterH   two adapters per block, after attention and after the MLP
    LoRA PEFT  unmerged, PEFT LoraConfig(target_modules=["c_attn"], r=4, alpha=32) — the paper's
               GPT-2 M rank; c_attn is GPT-2's fused q|k|v projection, so PEFT adapts q, k and v
               (the paper adapts q and v; the cost difference is one r×d slice)
    LoRA fastlora  the same PEFT model with every lora.Linear routed through fastlora.lora_linear
                   (fastlora.integrations.patching.patch)
    fastlora multi-adapter  a different adapter per sequence (batch adapters in a PEFT model, run
                   through fastlora.integrations.multi_peft.MultiAdapterModel); checked against PEFT's mixed batch

Output: a table (ms ± std, the ratio to merged with its 95% interval, the paper's numbers beside), a
CSV in the output folder (benchmarks/out/ unless --out-dir; benchmarks.common.output_dir) with device,
dtype and versions, and a PNG (benchmarks/plot.py).

Ratio to merged: every trial times every row once (interleaved), so each trial gives one paired ratio
row / merged; the table reports their geometric mean with a 95% Student-t interval on the log ratios
(benchmarks.common.ratio_interval) and says "≈ merged" (indistinguishable) when the interval contains
1.0 — on a busy machine a row's mean can sit 20% above merged while the paired trials cannot tell
them apart.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapters as adp
from . import common

# Table 1 of Hu et al. 2021 (Quadro RTX8000): column -> (batch, seq, adapter |Θ|); "decode" (not in the paper):
# batch 1, one new token per step on a KV cache of DECODE_CACHE tokens, adapters sized as in the batch-1 column
COLUMNS = {"32x512": (32, 512, 0.5e6), "16x256": (16, 256, 11e6), "1x128": (1, 128, 11e6), "decode": (1, 1, 11e6)}
DECODE = "decode"
DECODE_CACHE = 128      # prompt tokens in the KV cache (the batch-1 column's sequence)
DECODE_STEPS = 8        # decode steps timed per trial (the trial's time: their mean, ms per token)
# row -> column -> (mean ms, std ms) as published; the LoRA rows compare against "Fine-Tune/LoRA".
PAPER = {
    "merged": {"32x512": (1449.4, 0.8), "16x256": (338.0, 0.6), "1x128": (19.8, 2.7)},
    "AdapterL": {"32x512": (1482.0, 1.0), "16x256": (354.8, 0.5), "1x128": (23.9, 2.1)},
    "AdapterH": {"32x512": (1492.2, 1.0), "16x256": (366.3, 0.5), "1x128": (25.8, 2.2)},
}
ROWS = ("merged", "AdapterL", "AdapterH", "LoRA PEFT", "LoRA fastlora")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CSV_COLUMNS = ("column", "batch", "seq", "kv_cache", "row", "mean_ms", "std_ms", "overhead_pct", "median_ms",
               "median_overhead_pct", "ratio", "ratio_lo", "ratio_hi", "vs_merged", "trials", "warmup",
               "paper_mean_ms", "paper_std_ms", "paper_overhead_pct", "adapter_params", "bottleneck_r",
               "lora_r", "n_layer", "n_embd", "device", "dtype", "versions", "timestamp")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 4, 32, 0.1    # the paper's GPT-2 M setting (Appendix D.3)


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    trials: int
    warmup: int
    columns: list[str]
    n_layer: int = 24
    n_embd: int = 1024
    n_head: int = 16
    vocab: int = 50257
    bottleneck: int | None = None      # None: derived per column from the paper's |Θ|
    out_dir: Path = common.OUT_DIR
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_table", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float16 on CUDA, float32 on CPU (the paper does not state its precision)")
    p.add_argument("--trials", type=int, default=None,
                   help="timed forward passes per cell (default: 100 on CUDA as in the paper, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--columns", default=None,
                   help=f"comma list of {', '.join(COLUMNS)} or 'all' (default: all on CUDA, 1x128 and decode "
                        f"on CPU)")
    p.add_argument("--quick", action="store_true", help="few trials (3 on CPU, 10 on CUDA) and 1 warm-up")
    common.add_out_dir_option(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g = p.add_argument_group("smoke-test sizes (not the paper's model)")
    g.add_argument("--n-layer", type=int, default=24)
    g.add_argument("--n-embd", type=int, default=1024)
    g.add_argument("--n-head", type=int, default=16)
    g.add_argument("--bottleneck", type=int, default=None, help="adapter r (default: derived from |Θ|)")
    return p


def make_config(args: argparse.Namespace) -> Config:
    """Turn parsed options into a Config; ValueError with a clear message on a bad value."""
    dev_s = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_s)
    except RuntimeError as e:
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {dev_s!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {dev_s!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev_s}: CUDA is not available on this machine (use --device cpu)")
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    if args.columns is None:
        columns = list(COLUMNS) if cuda else ["1x128", DECODE]
    elif args.columns.strip() == "all":
        columns = list(COLUMNS)
    else:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
        bad = [c for c in columns if c not in COLUMNS]
        if bad or not columns:
            raise ValueError(f"--columns: unknown column(s) {bad or [args.columns]}; "
                             f"choose from {', '.join(COLUMNS)} or 'all'")
    trials = args.trials if args.trials is not None else (
        (10 if cuda else 3) if args.quick else (100 if cuda else 10))
    if trials < 1:
        raise ValueError(f"--trials must be a positive integer, got {trials}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (10 if cuda else 2))
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    for name in ("n_layer", "n_embd", "n_head"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.bottleneck is not None and args.bottleneck < 1:
        raise ValueError(f"--bottleneck must be >= 1, got {args.bottleneck}")
    cfg = Config(device=device, dtype=dtype, trials=trials, warmup=warmup, columns=columns,
                 n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, bottleneck=args.bottleneck,
                 out_dir=common.output_dir(args.out_dir), progress=not args.no_progress)
    if not cuda and set(columns) != set(COLUMNS):
        cfg.notes.append("CPU default runs the batch 1 / seq 128 and decode columns only; the other columns "
                         "need --columns all (minutes per cell on a small CPU).")
    return cfg


# ---------------------------------------------------------------------------- models

def build_base(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """GPT-2 (medium by default) with random weights from a config, eval mode, on cfg.device/dtype."""
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(seed)
    conf = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab,
                      n_positions=1024)
    model = GPT2Model(conf).to(device=cfg.device, dtype=cfg.dtype).eval()
    return model


def lora_config(init_b_zero: bool = False):
    from peft import LoraConfig
    # init_lora_weights=False: B random too, so the LoRA branch really adds something (timing is the same).
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=["c_attn"],
                      fan_in_fan_out=True, init_lora_weights=True if init_b_zero else False)


def make_variant(base: torch.nn.Module, row: str, cfg: Config, column: str, zero_init: bool = False):
    """(model, adapter_params, bottleneck_r) for one row of the table; ``base`` is not modified."""
    if row == "merged":
        return base, 0, None
    model = copy.deepcopy(base)
    if row in ("AdapterL", "AdapterH"):
        kind = row[-1]
        r = cfg.bottleneck or adp.bottleneck_for(kind, cfg.n_layer, cfg.n_embd, COLUMNS[column][2])
        added = adp.add_adapters(model, kind, r, zero_init=zero_init)
        return model.eval(), adp.adapter_param_count(added), r
    if row in ("LoRA PEFT", "LoRA fastlora"):
        from peft import get_peft_model
        torch.manual_seed(1)               # both LoRA rows get the same adapter weights
        model = get_peft_model(model, lora_config(init_b_zero=zero_init)).eval()
        n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
        if row == "LoRA fastlora":
            from fastlora.integrations.patching import patch
            patch(model, strict=True)      # every lora.Linear now calls fastlora.lora_linear
        return model, n, None
    raise ValueError(f"unknown row {row!r}; rows are {ROWS}")


class _PerSequenceAdapters(torch.nn.Module):
    """Calls a fastlora MultiAdapterModel with adapter ``a{b}`` for sequence b of the batch."""

    def __init__(self, multi, names):
        super().__init__()
        self.multi, self.names = multi, names

    def forward(self, input_ids, use_cache=False, **kwargs):
        return self.multi(input_ids=input_ids, use_cache=use_cache, adapter_names=self.names, **kwargs)


def multi_adapter_row(base, cfg: Config, column: str, zero_init: bool = False):
    """HOOK — the "fastlora multi-adapter" row: a different LoRA adapter (r=4, on c_attn) per sequence.

    A PEFT model holding ``batch`` adapters, run through fastlora.integrations.multi_peft.MultiAdapterModel (packed
    adapter bank, gather kernels). Returns (model, LoRA params, None). The first forward is checked against
    PEFT's own mixed-batch forward (adapter_names=). fastlora.ops.multi is part of fastlora: an import error
    there is an error here, not a missing row.
    """
    from fastlora.integrations.multi_peft import MultiAdapterModel
    from peft import get_peft_model
    b = COLUMNS[column][0]
    names = [f"a{i}" for i in range(b)]
    torch.manual_seed(2)
    model = get_peft_model(copy.deepcopy(base), lora_config(zero_init), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, lora_config(zero_init))
    model.eval()
    ids = _inputs(cfg, column)
    def peft_mixed(m):
        return m(input_ids=ids, use_cache=False, adapter_names=names).last_hidden_state

    with torch.inference_mode():
        ref = peft_mixed(model)
    params = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    fp32 = _fp32_copy(model) if cfg.dtype != torch.float32 else None     # before MultiAdapterModel swaps layers
    wrapped = _PerSequenceAdapters(MultiAdapterModel(model), names).eval()
    with torch.inference_mode():
        check_row("fastlora multi-adapter", forward(wrapped, ids), ref, lambda: peft_mixed(fp32))
    return wrapped, params, None


def _inputs(cfg: Config, column: str, seed: int = 0) -> torch.Tensor:
    """The column's token ids (batch, seq); for decode the prompt that fills the KV cache (1, DECODE_CACHE)."""
    b, s, _ = COLUMNS[column]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab, (b, DECODE_CACHE if column == DECODE else s), generator=g).to(cfg.device)


def forward(model, ids):
    out = model(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _cache_kw() -> str:
    """GPT2Model's keyword for a KV cache: ``cache`` (transformers >= 5.2x), ``past_key_values`` before."""
    import inspect
    from transformers import GPT2Model
    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


class Call:
    """One timed call of a row's model in a column: a full forward over the column's ids, or (decode) one new
    token on the model's own KV cache of the DECODE_CACHE-token prompt; ``reset`` (untimed) crops the cache back
    so that every step does the same work."""

    def __init__(self, model, cfg: Config, column: str):
        self.model, self.ids, self.cache = model, _inputs(cfg, column), None
        if column == DECODE:
            self.kw = _cache_kw()
            with torch.inference_mode():
                out = model(input_ids=self.ids, use_cache=True)
            self.cache = out[self.kw] if self.kw in out else out["past_key_values"]   # output named as the input
            self.ids = torch.randint(0, cfg.vocab, (1, 1), generator=torch.Generator().manual_seed(1)).to(cfg.device)

    def __call__(self) -> torch.Tensor:
        if self.cache is None:
            return forward(self.model, self.ids)
        out = self.model(input_ids=self.ids, use_cache=True, **{self.kw: self.cache})
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def reset(self) -> None:
        if self.cache is not None and self.cache.get_seq_length() > DECODE_CACHE:
            self.cache.crop(DECODE_CACHE - self.cache.get_seq_length())     # negative: drop that many tokens


# ---------------------------------------------------------------------------- run

def _agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out − ref| / max |ref| — the fastlora row must compute what the PEFT row computes."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


# Relative error allowed beyond twice PEFT's own (float32 rounding differs by GEMM order).
AGREE_ATOL = 1e-4


def check_row(row: str, out: torch.Tensor, peft_out: torch.Tensor, peft_fp32) -> None:
    """The project's tolerance idiom (tests/_tolerance.py) at model level: the fastlora row's error vs a float32
    run of the PEFT model is at most 2x the PEFT row's own error plus AGREE_ATOL (relative to max|reference|).

    ``peft_fp32``: a callable giving that float32 output (called only for half-precision tables; a float32
    table is its own reference). A wrong adapter or wiring is an O(1) error; rounding amplified through a
    deep random model is not, and is large in half precision: rounding is amplified through 24 fp16 layers of a
    random GPT-2 with random LoRA B, for PEFT's own output too (a fixed bound failed the multi-adapter row on the
    one GPU run: docs/benchmarks.md, "GPU runs", gives the figures)."""
    ref = peft_out.float() if peft_out.dtype == torch.float32 else peft_fp32().float()
    err, base = _agreement(ref, out), _agreement(ref, peft_out)
    if not err <= 2 * base + AGREE_ATOL:
        raise RuntimeError(f"{row} row disagrees with PEFT: rel. error vs float32 {err:.2e} > 2 x PEFT's "
                           f"{base:.2e} + {AGREE_ATOL:g}")


def _fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(model).float()


def ratio_to_merged(row_ms: list[float], merged_ms: list[float]) -> dict:
    """Paired per-trial ratios row / merged (element t of both lists ran in the same interleaved trial) ->
    dict(ratio (geometric mean), lo, hi (95% interval; nan with one trial), verdict): verdict is
    "indistinguishable" when the interval contains 1.0 (or there is no interval), else "slower" / "faster"."""
    if len(row_ms) != len(merged_ms) or not row_ms:
        raise ValueError(f"paired trials needed: {len(row_ms)} row times vs {len(merged_ms)} merged times")
    ratio, lo, hi = common.ratio_interval([a / b for a, b in zip(row_ms, merged_ms)])
    verdict = "indistinguishable" if common.indistinguishable(lo, hi) else ("slower" if lo > 1 else "faster")
    return dict(ratio=ratio, lo=lo, hi=hi, verdict=verdict)


def _time_interleaved(calls: dict[str, Call], cfg: Config, column: str, bar) -> dict[str, list[float]]:
    """Per-row trial times (ms). Rows are interleaved — each trial times every row once, in a fresh
    random order — so a slow spell on a shared machine hits all rows alike instead of one row. A decode
    trial is the mean of DECODE_STEPS separately timed steps (the cache cropped back between them)."""
    import random
    steps = DECODE_STEPS if column == DECODE else 1

    def one(call):
        ts = []
        for _ in range(steps):
            ts += common.time_ms(call, cfg.device, 1, 0)
            call.reset()
        return sum(ts) / steps

    with torch.inference_mode():
        for call in calls.values():
            for _ in range(cfg.warmup):
                call()
                call.reset()
        times = {row: [] for row in calls}
        order = list(calls)
        rng = random.Random(0)
        for _ in range(cfg.trials):
            rng.shuffle(order)
            for row in order:
                times[row].append(one(calls[row]))
                bar.update(1)
    return times


def run(cfg: Config, rows=ROWS, base=None) -> list[dict]:
    """Time every (column, row); returns CSV rows (dicts keyed by CSV_COLUMNS)."""
    from tqdm.auto import tqdm
    base = base if base is not None else build_base(cfg)
    dev_name, vers, stamp = common.device_name(cfg.device), common.versions(), common.timestamp()
    out = []
    hooks = {"fastlora multi-adapter": multi_adapter_row}     # HOOK: rows that may not exist yet
    bar = tqdm(total=len(cfg.columns) * (len(rows) + len(hooks)) * cfg.trials, desc="paper table",
               unit="fwd", disable=not cfg.progress)
    for column in cfg.columns:
        b, s, theta = COLUMNS[column]
        bar.set_postfix_str(f"{column}: building models")
        made = {row: make_variant(base, row, cfg, column) for row in rows}
        for row, hook in hooks.items():
            m = hook(base, cfg, column)
            if m is None:
                bar.total -= cfg.trials
            else:
                made[row] = m
        calls = {row: Call(m[0], cfg, column) for row, m in made.items()}
        if "LoRA PEFT" in made and "LoRA fastlora" in made:
            peft_model = made["LoRA PEFT"][0]
            with torch.inference_mode():      # the timed call itself (decode: a step on the cache), then reset
                got, ref = calls["LoRA fastlora"](), calls["LoRA PEFT"]()
                check_row("LoRA fastlora", got, ref, lambda: Call(_fp32_copy(peft_model), cfg, column)())
                calls["LoRA fastlora"].reset(), calls["LoRA PEFT"].reset()
        bar.set_postfix_str(_column_title(column))
        times = _time_interleaved(calls, cfg, column, bar)
        results, paired = {}, {}
        for row, ts in times.items():
            mean = sum(ts) / len(ts)
            std = (sum((t - mean) ** 2 for t in ts) / max(len(ts) - 1, 1)) ** 0.5
            results[row] = (mean, std, common.quantile(ts, 0.5), made[row][1], made[row][2])
            if "merged" in times:
                paired[row] = ratio_to_merged(ts, times["merged"])
        del made, calls
        bar.refresh()
        base_mean = results["merged"][0] if "merged" in results else None
        pbase = PAPER["merged"].get(column, ("",))[0]
        base_median = results["merged"][2] if "merged" in results else None
        for row, (mean, std, median, params, r) in results.items():
            paper = PAPER.get(row, {})      # the paper has no unmerged-LoRA row
            pm, ps = paper.get(column, ("", ""))
            pr = paired.get(row)
            fmt = lambda k: "" if pr is None or pr[k] != pr[k] else f"{pr[k]:.4f}"   # noqa: E731 (x != x: nan)
            out.append(dict(
                column=column, batch=b, seq=s, kv_cache=DECODE_CACHE if column == DECODE else "", row=row, mean_ms=f"{mean:.3f}", std_ms=f"{std:.3f}",
                overhead_pct=f"{100 * (mean / base_mean - 1):.2f}" if base_mean else "",
                median_ms=f"{median:.3f}",
                median_overhead_pct=f"{100 * (median / base_median - 1):.2f}" if base_median else "",
                ratio=fmt("ratio"), ratio_lo=fmt("lo"), ratio_hi=fmt("hi"),
                vs_merged=pr["verdict"] if pr and row != "merged" else "",
                trials=cfg.trials, warmup=cfg.warmup, paper_mean_ms=pm, paper_std_ms=ps,
                paper_overhead_pct=f"{100 * (pm / pbase - 1):.1f}" if pm != "" else "",
                adapter_params=params, bottleneck_r=r if r is not None else "",
                lora_r=LORA_R if row.startswith("LoRA") or "multi" in row else "",
                n_layer=cfg.n_layer, n_embd=cfg.n_embd, device=dev_name,
                dtype=str(cfg.dtype).replace("torch.", ""), versions=vers, timestamp=stamp))
    bar.close()
    return out


def _column_title(column: str) -> str:
    b, s, _ = COLUMNS[column]
    if column == DECODE:
        return f"decode: batch {b}, one new token per step, KV cache {DECODE_CACHE}"
    return f"batch {b} / seq {s}"


def _ratio_cell(r: dict) -> str:
    """'1.234x [1.10, 1.38] slower' or '... ≈ merged' from a CSV row ('' for merged or without merged)."""
    if r["ratio"] == "" or r["row"] == "merged":
        return ""
    ci = f" [{float(r['ratio_lo']):.2f}, {float(r['ratio_hi']):.2f}]" if r["ratio_lo"] != "" else " [1 trial]"
    word = "≈ merged" if r["vs_merged"] == "indistinguishable" else r["vs_merged"]
    return f"{float(r['ratio']):.3f}x{ci} {word}"


def format_table(rows: list[dict]) -> str:
    """The result as a text table: measured ms ± std, ratio to merged [95% interval] | paper ms ± std (%)."""
    lines = []
    for column in dict.fromkeys(r["column"] for r in rows):
        sel = [r for r in rows if r["column"] == column]
        b, s, theta = COLUMNS[column]
        unit = f", ms per token (mean of {DECODE_STEPS} steps per trial)" if column == DECODE else ""
        lines.append(f"\n{_column_title(column)}   (adapter |Θ| target {theta / 1e6:g}M; "
                     f"{sel[0]['device']}, {sel[0]['dtype']}, {sel[0]['trials']} trials{unit})")
        lines.append(f"  {'row':<24}{'measured ms':>22}{'median ms':>11}   {'ratio to merged [95%]':<32}"
                     f"{'paper ms (RTX8000)':>24}   {'params':>10}  r")
        for r in sel:
            paper = (f"{r['paper_mean_ms']}±{r['paper_std_ms']} ({float(r['paper_overhead_pct']):+.1f}%)"
                     if r["paper_mean_ms"] != "" else "—")
            rr = r["bottleneck_r"] if r["bottleneck_r"] != "" else r["lora_r"]
            lines.append(f"  {r['row']:<24}{float(r['mean_ms']):>13.2f} ± {float(r['std_ms']):<6.2f}"
                         f"{float(r['median_ms']):>11.2f}   {_ratio_cell(r):<32}{paper:>24}   "
                         f"{r['adapter_params']:>10}  {rr}")
    lines.append("\nratio to merged: geometric mean of the per-trial ratios row / merged (all rows timed in every "
                 "trial, in random order) with a 95% t-interval;\n'≈ merged': the interval contains 1.0, so these "
                 "trials cannot tell the row from merged (rerun with more --trials or on a quieter machine)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as e:
        p.error(str(e))
    common.quiet_transformers()
    for column in cfg.columns:
        for kind in ("L", "H"):
            theta = COLUMNS[column][2]
            r = cfg.bottleneck or adp.bottleneck_for(kind, cfg.n_layer, cfg.n_embd, theta)
            print(f"Adapter{kind} {column}: bottleneck r = {r} "
                  f"({'given' if cfg.bottleneck else f'closest to |Θ| = {theta / 1e6:g}M'}: "
                  f"|Θ| = {adp.paper_param_count(kind, cfg.n_layer, cfg.n_embd, r):,})")
    print(f"LoRA: PEFT on c_attn (q|k|v), r = {LORA_R}, alpha = {LORA_ALPHA} (the paper's GPT-2 M setting)")
    rows = run(cfg)
    print(format_table(rows))
    tag = f"{common.device_tag(cfg.device)}_{str(cfg.dtype).replace('torch.', '')}"
    csv_path = common.write_csv(cfg.out_dir / f"paper_table_{tag}.csv", CSV_COLUMNS, rows)
    from . import plot
    png = plot.plot_paper_table(csv_path, csv_path.with_suffix(".png"))
    print(f"\nwrote {csv_path}\nwrote {png}")
    for n in cfg.notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
