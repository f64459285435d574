"""Microbenchmark: one linear layer with many LoRA adapters in one batch (each token its own adapter).

    python -m pytest benchmarks/bench_multi.py --benchmark-only -q     # CSV + PNG in benchmarks/out/
    python -m benchmarks.bench_multi [--rounds 60] [--threads 1]       # paired speed-ups over PEFT, 95% intervals

(the output folder: $FASTLORA_BENCH_OUT if set, else benchmarks/out/, git-ignored; benchmarks.common.output_dir)

Providers (all compute y = x·W0ᵀ + bias + s_k·(x·A_kᵀ)·B_kᵀ with k = the token's adapter, eval mode):
    base       F.linear(x, W0, bias): the floor, no LoRA at all
    fastlora   fastlora.nn.multi.MultiLoraLinear over an AdapterBank packed without padding, given the batch plan
               (CUDA: the gather kernels; CPU without TRITON_INTERPRET: the pure-torch path, per-adapter
               segments or dense masking by its cost model)
    plan       fastlora.plan_batch alone: built once per model forward and shared by every layer, so a
               model pays it once, not per layer
    peft       peft.tuners.lora.Linear holding every adapter, PEFT's mixed batch: layer(x, adapter_names=[...])
    padded     the same MultiLoraLinear over a bank whose adapters are zero-padded to r_max, as vLLM / Punica
               store them: identical maths, so the gap to "fastlora" is what packing saves
    loop       a Python loop over adapters: fastlora.lora_linear on each adapter's tokens (index lists
               built per call from the host-side ids, as PEFT does with names)
    base_graph, fastlora_graph   (CUDA only) base / fastlora captured once in a CUDA graph, timed as replays
Scenarios: decode = 32 adapters × 1 token, prefill = 8 adapters × 512 tokens; ranks uniform 16
or mixed {8, 16, 64, 128} (cycled over adapters); tokens of different adapters interleaved (unsorted).
Shapes: CPU d = 2048 float32 (toy d 128 with FASTLORA_BENCH_TINY=1); CUDA (only when available) d = 4096 bfloat16
(adapters bf16).
The ids tensor and the plan are built once per batch (outside the layer's timing, as a server / MultiAdapterModel
does once per forward for all layers; the "plan" row times it).

test_multi_model_decode: a whole model instead of one layer — a 2-layer Llama (CPU d 1024, CUDA d 4096), 32
adapters r 16 on q_proj/k_proj/v_proj/o_proj, 32 sequences × 1 token (the decode shape, no KV cache), eval:
base (PEFT's disable_adapter), peft (PEFT's mixed batch, adapter_names=), fastlora (MultiAdapterModel, the
same names: one plan per forward).
FASTLORA_BENCH_THREADS=n sets torch's CPU threads (the CSV's device column records the count).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import fastlora
from benchmarks import common
from fastlora.ops.bank import AdapterBank
from fastlora.nn.multi import MultiLoraLinear
from fastlora.ops.multi_plan import plan_batch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
D = 4096 if CUDA else (128 if common.TINY else 2048)
SCENARIOS = {"decode": (32, 1), "prefill": (8, 32 if common.TINY else 512)}     # (adapters, tokens per adapter)
MODEL_D = 4096 if CUDA else (128 if common.TINY else 1024)
RANKS = {"uniform16": (16,), "mixed8-128": (8, 16, 64, 128)}
ROUNDS = {"decode": int(os.environ.get("FASTLORA_BENCH_ROUNDS", 100 if CUDA else 30)),
          "prefill": int(os.environ.get("FASTLORA_BENCH_ROUNDS", 50 if CUDA else 5))}
PROVIDERS = ["base", "fastlora", "plan", "peft", "padded", "loop"] + (["base_graph", "fastlora_graph"] if CUDA else [])
if "FASTLORA_BENCH_THREADS" in os.environ:     # e.g. 1 on a shared, loaded CPU: steadier timings
    torch.set_num_threads(int(os.environ["FASTLORA_BENCH_THREADS"]))


class MultiLayer:
    """Every provider's callable over the same base layer, adapters and batch."""

    def __init__(self, n, per, ranks):
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(DEVICE, DTYPE)   # noqa: E731
        self.base = torch.nn.Linear(D, D, device=DEVICE, dtype=DTYPE).requires_grad_(False)
        self.rs = [ranks[i % len(ranks)] for i in range(n)]
        self.r_max = max(self.rs)
        self.bank = AdapterBank(D, D, dtype=DTYPE, device=DEVICE)
        self.padded_bank = AdapterBank(D, D, dtype=DTYPE, device=DEVICE)
        self.peft = None
        self.adapters = []
        for i, r in enumerate(self.rs):
            A, B, alpha = mk(r, D), mk(D, r), 2.0 * r
            self.adapters.append((A, B, alpha / r))
            self.bank.add(f"a{i}", A, B, alpha=alpha)
            pad = self.r_max - r
            self.padded_bank.add(f"a{i}", F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad)), scaling=alpha / r)
            cfg = LoraConfig(r=r, lora_alpha=alpha)
            if self.peft is None:
                self.peft = PeftLinear(self.base, f"a{i}", cfg, r=r, lora_alpha=alpha)
            else:
                self.peft.update_layer(f"a{i}", r, alpha, cfg)
            with torch.no_grad():
                self.peft.lora_A[f"a{i}"].weight.copy_(A)
                self.peft.lora_B[f"a{i}"].weight.copy_(B)
        self.peft.to(DEVICE, DTYPE).eval()
        M = n * per
        order = torch.randperm(M, generator=g)
        self.ids_host = [int(i) % n for i in order]                     # interleaved, unsorted
        self.names = [f"a{k}" for k in self.ids_host]
        self.ids = torch.tensor(self.ids_host, dtype=torch.int32, device=DEVICE)
        self.x = torch.randn(M, D, generator=g).to(DEVICE, DTYPE)
        self.fast = MultiLoraLinear(self.base, self.bank)
        self.padded = MultiLoraLinear(self.base, self.padded_bank)
        self.plan = plan_batch(self.bank, self.ids, self.x)
        self.padded_plan = plan_batch(self.padded_bank, self.ids, self.x)

    def call(self, provider):
        x = self.x
        if provider == "base":
            return F.linear(x, self.base.weight, self.base.bias)
        if provider == "fastlora":
            return self.fast(x, plan=self.plan)
        if provider == "plan":
            return plan_batch(self.bank, self.ids, x)
        if provider == "padded":
            return self.padded(x, plan=self.padded_plan)
        if provider == "peft":
            return self.peft(x, adapter_names=self.names)
        if provider == "loop":
            y = torch.empty(x.shape[0], D, device=DEVICE, dtype=DTYPE)
            for k, (A, B, s) in enumerate(self.adapters):
                idx = torch.tensor([m for m, a in enumerate(self.ids_host) if a == k], device=DEVICE)
                if idx.numel():
                    y[idx] = fastlora.lora_linear(x[idx], self.base.weight, self.base.bias, A, B, s)
            return y
        raise ValueError(provider)

    def reference64(self):
        x = self.x.double()
        y = F.linear(x, self.base.weight.double(), self.base.bias.double())
        for k, (A, B, s) in enumerate(self.adapters):
            yk = y + s * (x @ A.double().t()) @ B.double().t()
            y = torch.where((self.ids == k)[:, None], yk, y)
        return y


_layers: dict = {}


def layer_for(scenario, ranks):
    key = (scenario, ranks)
    if key not in _layers:
        _layers.clear()                        # one scenario's tensors alive at a time
        n, per = SCENARIOS[scenario]
        _layers[key] = MultiLayer(n, per, RANKS[ranks])
    return _layers[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ranks", list(RANKS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_multi_forward(benchmark, record, scenario, ranks, provider):
    layer = layer_for(scenario, ranks)
    if provider not in ("base", "plan", "base_graph", "fastlora_graph"):   # every provider: the same layer
        with torch.no_grad():
            y = layer.call(provider).double()
        ref = layer.reference64()
        tol = 1e-4 if DTYPE == torch.float32 else 3e-2          # relative to max|y|: rounding of a K-sum
        assert (y - ref).abs().max() <= tol * ref.abs().max(), provider

    if provider.endswith("_graph"):          # the same call captured once in a CUDA graph, timed as replays
        graph = common.cuda_graph(lambda: layer.call(provider[:-len("_graph")]))

        def fn():
            graph.replay()
            torch.cuda.synchronize()
    else:
        def fn():
            with torch.no_grad():
                layer.call(provider)
            if CUDA:
                torch.cuda.synchronize()

    benchmark.pedantic(fn, rounds=ROUNDS[scenario], warmup_rounds=2, iterations=1)
    n, per = SCENARIOS[scenario]
    record(benchmark, kernel="multi_lora", provider=provider, mode="fwd",
           shape=f"{scenario} n{n}x{per} d{D} r={ranks}", dtype=DTYPE, device=DEVICE)


# ---------------------------------------------------------------------------
# a whole model's decode-shaped step
# ---------------------------------------------------------------------------

MODEL_PROVIDERS = ["base", "fastlora", "peft"]
_models: dict = {}


def model_for():
    """PEFT Llama with 32 adapters, input ids, one adapter name per sequence, PEFT's own output; built once."""
    if not _models:
        import peft
        import transformers
        d = MODEL_D
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=d, intermediate_size=d * 11 // 4,
                                       num_hidden_layers=2, num_attention_heads=d // 128,
                                       num_key_value_heads=d // 128, max_position_embeddings=64)
        base = transformers.LlamaForCausalLM(cfg).to(DEVICE, DTYPE).eval()
        lcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = peft.get_peft_model(base, lcfg, adapter_name="a0")
        for i in range(1, 32):
            model.add_adapter(f"a{i}", lcfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.02)
            model.eval()
            names = [f"a{k}" for k in torch.randperm(32, generator=torch.Generator().manual_seed(1)).tolist()]
            ids = torch.randint(0, 1000, (32, 1), generator=torch.Generator().manual_seed(2)).to(DEVICE)
            out = model(ids, adapter_names=names, use_cache=False).logits
        _models.update(model=model, ids=ids, names=names, peft_out=out)
    return _models


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_multi_model_decode(benchmark, record, provider):
    from fastlora.integrations.multi_peft import MultiAdapterModel
    m = model_for()
    model, ids, names = m["model"], m["ids"], m["names"]
    mm = MultiAdapterModel(model) if provider == "fastlora" else None
    try:
        if provider == "fastlora":
            fn = lambda: mm(ids, adapter_names=names, use_cache=False)                 # noqa: E731
            with torch.no_grad():
                out, ref = fn().logits, m["peft_out"]
            tol = 1e-4 if DTYPE == torch.float32 else 3e-2     # relative to max|logits|: rounding of K-sums
            assert (out - ref).abs().max() <= tol * ref.abs().max()
        elif provider == "peft":
            fn = lambda: model(ids, adapter_names=names, use_cache=False)              # noqa: E731
        else:   # adapters off for the whole timing (entering disable_adapter walks every module: not timed)
            fn = lambda: model(ids, use_cache=False)                                   # noqa: E731

        def run():
            with torch.no_grad():
                fn()
            if CUDA:
                torch.cuda.synchronize()

        with model.disable_adapter() if provider == "base" else contextlib.nullcontext():
            benchmark.pedantic(run, rounds=ROUNDS["decode"], warmup_rounds=2, iterations=1)
    finally:
        if mm is not None:
            mm.restore()
    record(benchmark, kernel="multi_lora_model", provider=provider, mode="fwd",
           shape=f"llama 2 layers d{MODEL_D}, 32 adapters r16 on qkvo, 32 x 1 tokens",
           dtype=DTYPE, device=DEVICE)


# ---------------------------------------------------------------------------
# paired ratios: python -m benchmarks.bench_multi [--rounds N] [--threads T]
# ---------------------------------------------------------------------------
# The targets are speed-ups over PEFT, and a shared CPU drifts by tens of percent over a run: here each round
# times the providers back to back (rotating order) and the ratio is taken per round (a slow spell hits both);
# the geometric mean and its 95% interval are reported (benchmarks.common.ratio_interval).

def paired(calls: dict, rounds: int) -> dict:
    """{name: [per-round time / time of the first provider]} for the callables in ``calls`` (no grad)."""
    import time
    names = list(calls)

    def once(name):
        t0 = time.perf_counter()
        with torch.no_grad():
            calls[name]()
        if CUDA:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in names:
        once(n), once(n)
    ratios = {n: [] for n in names[1:]}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        t = {n: once(n) for n in order}
        for n in names[1:]:
            ratios[n].append(t[n] / t[names[0]])
    return ratios


def main(argv=None) -> int:
    import argparse
    from benchmarks import common
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_multi",
                                 description="paired speed-ups of the multi-adapter layer and model over PEFT")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model decode step")
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    if a.rounds < 2:
        ap.error(f"--rounds must be >= 2, got {a.rounds}")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = common.device_name(DEVICE)
    print(f"paired ratios on {dev}, {DTYPE}, {a.rounds} rounds (time of X / time of fastlora: > 1 = fastlora faster)")
    rows = []

    def report(label, shape, ratios):
        for name, rs in ratios.items():
            gm, lo, hi = common.ratio_interval(rs)
            print(f"  {label:<28} {name:>6} / fastlora = {gm:.3f} (95% {lo:.3f}-{hi:.3f})")
            rows.append(dict(kernel="multi_lora_ratio", provider=f"{name}/fastlora", mode="fwd", shape=shape,
                             median_ms=f"{gm:.4f}", p20_ms=f"{lo:.4f}", p80_ms=f"{hi:.4f}", rounds=a.rounds,
                             device=dev, dtype=str(DTYPE).replace("torch.", ""), versions=common.versions(),
                             timestamp=common.timestamp()))

    for scenario in SCENARIOS:
        for ranks in RANKS:
            layer = layer_for(scenario, ranks)
            calls = {p: (lambda p=p: layer.call(p)) for p in ("fastlora", "peft", "base")}   # base/fastlora < 1
            n, per = SCENARIOS[scenario]
            report(f"layer {scenario} {ranks}", f"{scenario} n{n}x{per} d{D} r={ranks}", paired(calls, a.rounds))
    if not a.no_model:                     # a wrapped copy, so that PEFT's own layers stay in the original
        import copy
        from fastlora.integrations.multi_peft import MultiAdapterModel
        m = model_for()
        model, ids, names = m["model"], m["ids"], m["names"]
        mm = MultiAdapterModel(copy.deepcopy(model))
        calls = {"fastlora": lambda: mm(ids, adapter_names=names, use_cache=False),
                 "peft": lambda: model(ids, adapter_names=names, use_cache=False)}
        report("model decode 32x1", "llama 2 layers, 32 adapters r16 qkvo, 32 x 1", paired(calls, a.rounds))
    path = common.write_csv(f"{common.output_dir(a.out_dir)}/multi_lora_ratios_{common.device_tag(DEVICE)}.csv",
                            common.MICRO_COLUMNS, rows)
    print(f"wrote {path} (the *_ms columns hold the ratio and its 95% interval)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
