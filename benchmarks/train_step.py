"""One optimizer step of a Llama-architecture model with LoRA: PEFT vs PEFT + fastlora.patch.

    python -m benchmarks.train_step --quick      # tiny configuration, CPU, under a minute
    python -m benchmarks.train_step              # CUDA: Llama-3.2-1B dimensions, batch 8 x 1024, bfloat16
    python -m benchmarks.train_step --qlora      # the same with the base quantized to 4 bits (QLoRA, bitsandbytes)

Model: transformers LlamaForCausalLM built from a LlamaConfig with random weights (no download). LoRA:
PEFT LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05) on q, k, v, o, gate, up, down, init_lora_weights=False
(B random rather than zero, so the first step's loss and every adapter gradient go through the LoRA branch; the
cost is the same), adapters in PEFT's default dtype (float32 on a half base). One PEFT model is built, deep-
copied, and the copy patched with ``fastlora.patch(strict=True)``: same weights, same inputs.

A step is AdamW's: forward with labels (the causal-LM loss), backward, optimizer.step(); gradients are set to
None after each step, outside the timing. Rounds are interleaved: each round runs one step of each model on the
same batch, the order alternating, so a slow spell on a shared machine hits both. Reported per model: tokens/s
(median, p20, p80 over rounds); fastlora's speed-up over PEFT as the geometric mean of the per-round paired
ratios with a 95% interval (benchmarks.common.ratio_interval); memory:
  CUDA  peak = the model's resident bytes (parameters, buffers, optimizer state) + the step's peak above them
        (torch.cuda.max_memory_allocated after reset_peak_memory_stats), i.e. what a run of that model alone peaks at;
  CPU   no allocator statistics ("n/a"); both devices also report the bytes the forward saves for backward
        (torch.autograd.graph.saved_tensors_hooks, storages counted once, parameters excluded).
Before timing, the first step's loss and every LoRA gradient of both models are checked against a float64
(float32 on a half base) copy of the PEFT model: fastlora's error <= 2 x PEFT's own + 1e-4 (relative), the
project's tolerance idiom. That step runs with dropout off: torch's and fastlora's dropout masks come from
different generators, so only p = 0 can be compared exactly. Output: a table, CSV and PNG in the output folder.

--qlora: the random model is saved to a temporary folder and loaded twice with bitsandbytes' 4-bit NF4 quantization
(double quant, compute dtype = --dtype), so both models hold the same quantized weights; the same seed gives both the
same adapters; the reference for the first-step check is the dequantized model in float64 / float32.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from . import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROVIDERS = ("peft", "fastlora")
AGREE_ATOL = 1e-4          # relative error allowed beyond twice PEFT's own (as in benchmarks.paper_table)


@dataclass
class Sizes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int


CONFIGS = {
    # Llama-3.2-1B's dimensions (tied embeddings), batch 8 x 1024
    "1b": Sizes(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, batch=8, seq=1024),
    "quick": Sizes(hidden=256, intermediate=704, layers=2, heads=8, kv_heads=4, vocab=4096, batch=4, seq=128),
}
CSV_COLUMNS = ("provider", "config", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch",
               "seq", "r", "lora_dropout", "rounds", "warmup", "median_tok_s", "p20_tok_s", "p80_tok_s",
               "median_step_ms", "p20_step_ms", "p80_step_ms", "speedup_vs_peft", "speedup_lo", "speedup_hi",
               "peak_mib", "resident_mib", "step_peak_mib", "saved_mib", "memory_method", "first_loss",
               "loss_rel_err", "grad_rel_err", "patched_layers", "device", "dtype", "adapter_dtype",
               "versions", "timestamp")


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    name: str
    sizes: Sizes
    rounds: int
    warmup: int
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4
    qlora: bool = False
    out_dir: object = None
    notes: list[str] = field(default_factory=list)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--config", default=None, choices=list(CONFIGS),
                   help="model dimensions (default: 1b on CUDA, quick on CPU)")
    p.add_argument("--quick", action="store_true", help="the quick configuration, 5 rounds, 1 warm-up")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes), as QLoRA fine-tunes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; the CSV's device "
                                                             "column records the count)")
    common.add_out_dir_option(p)
    g = p.add_argument_group("sizes (override the configuration's)")
    for f in Sizes.__dataclass_fields__:
        g.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
    return p


def make_config(args: argparse.Namespace) -> Config:
    """Parsed options -> Config; ValueError naming the option on a bad value."""
    dev_s = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_s)
    except RuntimeError as e:
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {dev_s!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {dev_s!r}")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {dev_s}: CUDA is not available on this machine (use --device cpu)")
    name = "quick" if args.quick else (args.config or ("1b" if cuda else "quick"))
    if args.quick and args.config not in (None, "quick"):
        raise ValueError(f"--quick uses the quick configuration; drop --config {args.config}")
    sizes = replace(CONFIGS[name], **{f: getattr(args, f) for f in Sizes.__dataclass_fields__
                                      if getattr(args, f) is not None})
    for f, v in vars(sizes).items():
        if v < 1:
            raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {v}")
    if sizes.hidden % sizes.heads or sizes.heads % sizes.kv_heads:
        raise ValueError(f"--hidden ({sizes.hidden}) must be divisible by --heads ({sizes.heads}) and --heads by "
                         f"--kv-heads ({sizes.kv_heads})")
    if (sizes.hidden // sizes.heads) % 2:
        raise ValueError(f"the head size --hidden / --heads = {sizes.hidden // sizes.heads} must be even (RoPE)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.r < 1:
        raise ValueError(f"--r must be >= 1, got {args.r}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else (20 if cuda else 10))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step allocates AdamW's state), got {warmup}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    name = (name if sizes == CONFIGS[name] else f"{name} (sizes changed)") + (" 4-bit" if args.qlora else "")
    cfg = Config(device=device, dtype=dtype, name=name,
                 sizes=sizes, rounds=rounds, warmup=warmup, r=args.r, alpha=2 * args.r, dropout=args.dropout,
                 qlora=args.qlora, out_dir=common.output_dir(args.out_dir))
    if args.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError("--qlora needs bitsandbytes: pip install -e \".[qlora]\"") from e
    if not cuda and name == "1b":
        cfg.notes.append("the 1b configuration on a CPU takes minutes per step and tens of GB")
    return cfg


# ---------------------------------------------------------------------------- models

def base_model(cfg: Config, seed: int = 0):
    """The random-weight Llama on cfg.device / cfg.dtype, weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    s = cfg.sizes
    torch.manual_seed(seed)
    conf = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                       max_position_embeddings=max(s.seq, 128), tie_word_embeddings=True, use_cache=False)
    with torch.device(cfg.device):          # initialised where it runs (a 1B model's CPU init takes long)
        return LlamaForCausalLM(conf).to(dtype=cfg.dtype)


def with_lora(cfg: Config, base, seed: int = 1):
    """PEFT LoRA on ``base`` (train mode); adapters from ``seed``, so two calls give the same adapters."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=TARGETS,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, lora).train()


def build_peft(cfg: Config, seed: int = 0):
    """The PEFT model (train mode) on cfg.device / cfg.dtype, random weights from ``seed``."""
    return with_lora(cfg, base_model(cfg, seed))


def load_4bit(cfg: Config, folder: str):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=cfg.dtype)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=q, dtype=cfg.dtype,
                                            device_map={"": cfg.device})


def make_pair(cfg: Config):
    """(PEFT model, patched copy, number of patched layers, reference builder for the first-step check)."""
    from fastlora.integrations.patching import patch
    if not cfg.qlora:
        peft = build_peft(cfg)
        fast = copy.deepcopy(peft)
        ref = lambda: copy.deepcopy(peft).to(torch.float64 if cfg.dtype == torch.float32 else torch.float32)  # noqa: E731
    else:
        import tempfile
        folder = tempfile.mkdtemp(prefix="fastlora_train_step_")
        base_model(cfg).save_pretrained(folder)
        peft, fast = (with_lora(cfg, load_4bit(cfg, folder)) for _ in range(2))
        ref = lambda: dequantized_reference(cfg, folder, peft)  # noqa: E731
    report = patch(fast, strict=True)
    return peft, fast, len(report.patched), ref


def dequantized_reference(cfg: Config, folder: str, peft):
    """The 4-bit PEFT model's maths in float64 (float32 on a half base): its dequantized weights, its adapters."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    from fastlora.ops.qlora import dequantize
    dt = torch.float64 if cfg.dtype == torch.float32 else torch.float32
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=dt).to(cfg.device)
    with torch.no_grad():
        for name, m in peft.base_model.model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                ref.get_submodule(name.replace(".base_layer", "")).weight.copy_(dequantize(m, dt))
    out = with_lora(cfg, ref)
    lora = {k: v.to(dt) for k, v in peft.state_dict().items() if "lora_" in k}
    out.load_state_dict(lora, strict=False)
    return out.to(dt)


def batch(cfg: Config, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, cfg.sizes.vocab, (cfg.sizes.batch, cfg.sizes.seq), generator=g).to(cfg.device)


def loss_of(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _set_dropout(model, p: float) -> None:
    """Set p of every LoRA dropout (PEFT's lora_dropout[adapter]); both PEFT and patched layers read it per call."""
    for name, m in model.named_modules():
        if type(m) is torch.nn.Dropout and ".lora_dropout." in f".{name}.":
            m.p = p


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double() for n, p in model.named_parameters() if p.requires_grad}


def check_agreement(peft, fast, ids, cfg: Config, ref=None) -> dict:
    """First step (dropout off, no update): loss and LoRA gradients of both models vs a float64 copy of the
    PEFT model (float32 for a half base; ``ref`` builds it, e.g. from dequantized weights). Raises RuntimeError
    when fastlora's error > 2 x PEFT's + AGREE_ATOL."""
    ref = ref() if ref is not None else copy.deepcopy(peft).to(torch.float64 if cfg.dtype == torch.float32
                                                                 else torch.float32)
    out = {}
    try:
        for m in (peft, fast, ref):
            _set_dropout(m, 0.0)
        for name, m in (("ref", ref), ("peft", peft), ("fastlora", fast)):
            m.zero_grad(set_to_none=True)
            loss = loss_of(m, ids)
            loss.backward()
            out[name] = (loss.item(), _lora_grads(m))
            m.zero_grad(set_to_none=True)
    finally:
        for m in (peft, fast):
            _set_dropout(m, cfg.dropout)
    del ref
    l_ref, g_ref = out["ref"]
    if not g_ref:
        raise RuntimeError("the PEFT model has no trainable parameters")
    errs = {}
    for name in PROVIDERS:
        loss, g = out[name]
        if set(g) != set(g_ref):
            raise RuntimeError(f"{name}: trainable parameters differ from the reference's")
        gerr = max(((g[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-30)).item() for k in g_ref)
        errs[name] = dict(loss=loss, loss_err=abs(loss - l_ref) / abs(l_ref), grad_err=gerr)
    p, f = errs["peft"], errs["fastlora"]
    for what in ("loss_err", "grad_err"):
        if not f[what] <= 2 * p[what] + AGREE_ATOL:     # also catches nan
            raise RuntimeError(f"fastlora disagrees with PEFT on the first step: {what} vs the reference "
                               f"{f[what]:.2e} > 2 x PEFT's {p[what]:.2e} + {AGREE_ATOL:g}")
    errs["ref_loss"] = l_ref
    return errs


# ---------------------------------------------------------------------------- memory

def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def resident_bytes(model, opt) -> int:
    """Parameters, buffers and optimizer state of one model (storages counted once)."""
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return _bytes([*model.parameters(), *model.buffers(), *state])


def saved_for_backward(model, ids) -> int:
    """Bytes the forward (with loss) saves for backward, parameters excluded, storages counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids)
    del loss
    return sum(seen.values())


# ---------------------------------------------------------------------------- timing

def one_step(model, opt, ids, device) -> tuple[float, float | None]:
    """(seconds, CUDA bytes allocated at the step's peak above what was allocated before it, or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    loss_of(model, ids).backward()
    opt.step()
    common.synchronize(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    opt.zero_grad(set_to_none=True)
    return dt, peak


def run(cfg: Config, progress=print) -> list[dict]:
    """Build, check, time; returns the CSV rows (one per provider)."""
    s = cfg.sizes
    peft, fast, n_patched, ref = make_pair(cfg)
    models = {"peft": peft, "fastlora": fast}
    adapter_dtype = str(next(p for n, p in peft.named_parameters() if "lora_A" in n).dtype).replace("torch.", "")
    progress(f"patched {n_patched} LoRA layers; checking the first step against a "
             f"{'float64' if cfg.dtype == torch.float32 else 'float32'} copy of the PEFT model")
    agree = check_agreement(peft, fast, batch(cfg, 0), cfg, ref)
    progress(f"first-step loss (dropout off): reference {agree['ref_loss']:.6f}, PEFT {agree['peft']['loss']:.6f}, "
             f"fastlora {agree['fastlora']['loss']:.6f}; relative error vs reference: loss PEFT "
             f"{agree['peft']['loss_err']:.1e} / fastlora {agree['fastlora']['loss_err']:.1e}, LoRA gradients "
             f"(max over parameters) PEFT {agree['peft']['grad_err']:.1e} / fastlora {agree['fastlora']['grad_err']:.1e}"
             f" -> agree (fastlora <= 2 x PEFT + {AGREE_ATOL:g})")
    saved = {k: saved_for_backward(m, batch(cfg, 0)) for k, m in models.items()}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr)
            for k, m in models.items()}
    times = {k: [] for k in models}
    peaks = {k: [] for k in models}
    for i in range(cfg.warmup + cfg.rounds):
        ids = batch(cfg, i)
        order = list(PROVIDERS) if i % 2 == 0 else list(reversed(PROVIDERS))
        for k in order:
            dt, peak = one_step(models[k], opts[k], ids, cfg.device)
            if i >= cfg.warmup:
                times[k].append(dt)
                peaks[k].append(peak)
        if i >= cfg.warmup:
            progress(f"round {i - cfg.warmup + 1}/{cfg.rounds}: " + ", ".join(
                f"{k} {times[k][-1] * 1e3:.1f} ms" for k in PROVIDERS))
    ratios = [tp / tf for tp, tf in zip(times["peft"], times["fastlora"])]      # > 1: fastlora faster
    speed = common.ratio_interval(ratios)
    tokens = s.batch * s.seq
    dev, vers, stamp = common.device_name(cfg.device), common.versions(), common.timestamp()
    cuda = cfg.device.type == "cuda"
    rows = []
    for k in PROVIDERS:
        tok = [tokens / t for t in times[k]]
        ms = [t * 1e3 for t in times[k]]
        resident = resident_bytes(models[k], opts[k])
        step_peak = max(peaks[k]) if cuda else None
        rows.append(dict(
            provider=k, config=cfg.name, layers=s.layers, hidden=s.hidden, intermediate=s.intermediate,
            heads=s.heads, kv_heads=s.kv_heads, vocab=s.vocab, batch=s.batch, seq=s.seq, r=cfg.r,
            lora_dropout=cfg.dropout, rounds=cfg.rounds, warmup=cfg.warmup,
            median_tok_s=f"{common.quantile(tok, 0.5):.1f}", p20_tok_s=f"{common.quantile(tok, 0.2):.1f}",
            p80_tok_s=f"{common.quantile(tok, 0.8):.1f}", median_step_ms=f"{common.quantile(ms, 0.5):.3f}",
            p20_step_ms=f"{common.quantile(ms, 0.2):.3f}", p80_step_ms=f"{common.quantile(ms, 0.8):.3f}",
            speedup_vs_peft=f"{speed[0]:.4f}" if k == "fastlora" else "1",
            speedup_lo=f"{speed[1]:.4f}" if k == "fastlora" and not math.isnan(speed[1]) else "",
            speedup_hi=f"{speed[2]:.4f}" if k == "fastlora" and not math.isnan(speed[2]) else "",
            peak_mib=f"{(resident + step_peak) / 2**20:.1f}" if cuda else "n/a",
            resident_mib=f"{resident / 2**20:.1f}",
            step_peak_mib=f"{step_peak / 2**20:.1f}" if cuda else "n/a",
            saved_mib=f"{saved[k] / 2**20:.2f}",
            memory_method=("cuda max_memory_allocated: resident + step peak" if cuda else
                           "n/a on CPU (no allocator statistics); saved_mib from saved_tensors_hooks"),
            first_loss=f"{agree[k]['loss']:.6f}", loss_rel_err=f"{agree[k]['loss_err']:.2e}",
            grad_rel_err=f"{agree[k]['grad_err']:.2e}", patched_layers=n_patched if k == "fastlora" else 0,
            device=dev, dtype=str(cfg.dtype).replace("torch.", ""), adapter_dtype=adapter_dtype,
            versions=vers, timestamp=stamp))
    return rows


def format_table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"\nLlama ({r0['layers']} layers, hidden {r0['hidden']}, intermediate {r0['intermediate']}, "
             f"{r0['heads']}/{r0['kv_heads']} heads, vocab {r0['vocab']}), batch {r0['batch']} x {r0['seq']}, "
             f"LoRA r {r0['r']} dropout {r0['lora_dropout']} on {len(TARGETS)} projections; {r0['dtype']} "
             f"(adapters {r0['adapter_dtype']}) on {r0['device']}; {r0['rounds']} interleaved rounds",
             f"  {'provider':<10}{'tokens/s median':>16}{'(p20 – p80)':>22}{'ms/step':>10}{'peak MiB':>10}"
             f"{'saved-for-bwd MiB':>19}"]
    for r in rows:
        lines.append(f"  {r['provider']:<10}{float(r['median_tok_s']):>16.1f}"
                     f"{'(' + r['p20_tok_s'] + ' – ' + r['p80_tok_s'] + ')':>22}{float(r['median_step_ms']):>10.1f}"
                     f"{r['peak_mib']:>10}{r['saved_mib']:>19}")
    f = next(r for r in rows if r["provider"] == "fastlora")
    if f["speedup_lo"]:
        lo, hi = float(f["speedup_lo"]), float(f["speedup_hi"])
        verdict = ("indistinguishable from PEFT (the interval contains 1)" if common.indistinguishable(lo, hi)
                   else ("faster than PEFT" if lo > 1 else "slower than PEFT"))
        lines.append(f"  fastlora speed-up over PEFT (paired per round, geometric mean): {float(f['speedup_vs_peft']):.3f}x"
                     f" [95% interval {lo:.3f}, {hi:.3f}]: {verdict}")
    else:
        lines.append(f"  fastlora speed-up over PEFT: {float(f['speedup_vs_peft']):.3f}x (one round: no interval)")
    if f["peak_mib"] == "n/a":
        lines.append("  peak memory: n/a on CPU (no allocator statistics); saved-for-bwd counts what the "
                     "forward keeps for backward (autograd saved_tensors_hooks)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as e:
        p.error(str(e))
    common.quiet_transformers()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for n in cfg.notes:
        print(n)
    rows = run(cfg)
    print(format_table(rows))
    tag = f"{common.device_tag(cfg.device)}_{str(cfg.dtype).replace('torch.', '')}{'_4bit' if cfg.qlora else ''}"
    path = common.write_csv(cfg.out_dir / f"train_step_{tag}.csv", CSV_COLUMNS, rows)
    from . import plot
    png = plot.plot_csv(path)
    print(f"\nwrote {path}\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
