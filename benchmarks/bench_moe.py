"""LoRA on MoE experts: PEFT's ``target_parameters`` vs the same PEFT model under fastlora.patch, training steps.

    python -m benchmarks.bench_moe                      # CPU: 1 thread, the issue's shape, paired ratios + CSV
    python -m benchmarks.bench_moe --rounds 20 --threads 2
    python -m benchmarks.bench_moe --tiny               # toy sizes, seconds (the GPU script's dry run)

(the output folder: --out-dir, else $FASTLORA_BENCH_OUT, else benchmarks/out/; benchmarks.common.output_dir)

Model: a transformers Qwen3-MoE built from a config with random weights (no download): hidden 1024, 32 experts,
top-4, expert width 512, 16 heads (4 KV), 1 decoder layer, vocab 1000, one sequence of 512 tokens (CUDA: bf16, 4
layers, 8 sequences; --layers / --tokens change it). LoRA r 16, alpha 32 on q/k/v/o_proj and on
mlp.experts.gate_up_proj and mlp.experts.down_proj; lora_B random (PEFT's zero B would skip nothing but would
make the parity check below vacuous).

Cases, each a forward + backward (gradients set to None outside the timing):
  layer   the MoE block alone (router + experts) on hidden states that require grad, as inside a model
  model   a whole training step: causal-LM loss of the model, backward
Providers:
  peft       PEFT's own forward (its parametrization adds s·B_e·A_e to every expert stack, every call)
  fastlora   the same model after fastlora.patch (fastlora.ops.moe: grouped base GEMM + per-expert LoRA)
  attn_only  LoRA on attention only (no expert LoRA), patched too: the floor the expert LoRA is measured against
             (GPU target: fastlora ≤ 1.15 × attn_only, unmeasured until a GPU run)
Timing is paired: each round runs every provider once, the order rotating, and the ratios peft / fastlora and
fastlora / attn_only are taken per round; the geometric mean and its 95% Student-t interval are reported
(benchmarks.common.ratio_interval), with each provider's median time. Memory: the bytes the forward saves for
backward (saved_tensors_hooks: storages counted once, parameters excluded). Before timing, fastlora's logits and
every LoRA gradient are checked against PEFT's (relative 1e-4 in fp32, 3e-2 in bf16).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch

from . import common

PROVIDERS = ("peft", "fastlora", "attn_only")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COLUMNS = ("bench", "case", "provider", "metric", "value", "lo", "hi", "rounds", "shape", "device", "dtype",
           "versions", "timestamp")


def sizes(device: torch.device, tiny: bool, layers: int | None, tokens: int | None) -> dict:
    if tiny:
        s = dict(hidden=64, experts=8, top_k=2, width=32, heads=4, kv=2, layers=1, batch=1, seq=32, r=4)
    elif device.type == "cuda":
        s = dict(hidden=1024, experts=32, top_k=4, width=512, heads=16, kv=4, layers=4, batch=8, seq=512, r=16)
    else:
        s = dict(hidden=1024, experts=32, top_k=4, width=512, heads=16, kv=4, layers=1, batch=1, seq=512, r=16)
    if layers:
        s["layers"] = layers
    if tokens:
        s["batch"], s["seq"] = 1, tokens
    return s


def shape_str(s: dict) -> str:
    return (f"qwen3_moe L{s['layers']} h{s['hidden']} E{s['experts']} top{s['top_k']} w{s['width']} "
            f"{s['batch']}x{s['seq']} tokens r{s['r']}")


def build(s: dict, device, dtype):
    """{provider: PEFT model} sharing one random base and one set of LoRA values; fastlora's and attn_only's patched."""
    import transformers
    from peft import LoraConfig, get_peft_model

    import fastlora
    common.quiet_transformers()
    cfg = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                                      head_dim=s["hidden"] // s["heads"], intermediate_size=2 * s["hidden"],
                                      moe_intermediate_size=s["width"], num_experts=s["experts"],
                                      num_experts_per_tok=s["top_k"], norm_topk_prob=True,
                                      max_position_embeddings=max(1024, s["seq"]))
    torch.manual_seed(0)
    base = transformers.Qwen3MoeForCausalLM(cfg).to(device, dtype)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=s["r"], lora_alpha=2 * s["r"], target_modules=attn,
                                                              target_parameters=EXPERTS))
        attn_only = get_peft_model(base, LoraConfig(r=s["r"], lora_alpha=2 * s["r"], target_modules=attn))
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(1)
        for m in (peft, attn_only):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    models["peft"] = peft.train()
    models["fastlora"] = copy.deepcopy(peft).train()
    models["attn_only"] = attn_only.train()
    for name in ("fastlora", "attn_only"):
        fastlora.patch(models[name], strict=True)
    return models


def block(model):
    return model.base_model.model.model.layers[0].mlp


def make_cases(models, s, device, dtype):
    """{case: {provider: callable running one forward + backward}} and the inputs they share."""
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, 1000, (s["batch"], s["seq"]), generator=g).to(device)
    x = (torch.randn(s["batch"], s["seq"], s["hidden"], generator=g) * 0.5).to(device, dtype).requires_grad_(True)

    def model_step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        return run

    def layer_step(m):
        blk = block(m)

        def run():
            m.zero_grad(set_to_none=True)
            x.grad = None
            blk(x).float().pow(2).mean().backward()
        return run
    return {"layer": {p: layer_step(m) for p, m in models.items()},
            "model": {p: model_step(m) for p, m in models.items()}}, ids, x


def check_parity(models, ids, dtype) -> float:
    """fastlora's logits and every LoRA gradient vs PEFT's on the same step; returns the worst relative error."""
    out = {}
    for p in ("peft", "fastlora"):
        m = models[p]
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, labels=ids)
        logits.loss.backward()
        out[p] = (logits.logits.detach().float(), {n: q.grad.float() for n, q in m.named_parameters()
                                                   if q.requires_grad})
        m.zero_grad(set_to_none=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    worst = 0.0
    pairs = [(out["fastlora"][0], out["peft"][0])] + [(out["fastlora"][1][n], g) for n, g in out["peft"][1].items()]
    for a, b in pairs:
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    if worst > tol:
        raise AssertionError(f"fastlora disagrees with PEFT: worst relative error {worst:.3g} > {tol}")
    return worst


def saved_bytes(fn, params) -> int:
    """Bytes the forward saves for backward: distinct storages, parameters excluded."""
    owned = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def paired(calls: dict, rounds: int, device, progress=None) -> dict:
    """{provider: [seconds per round]}: every round runs each provider once, the order rotating."""
    names = list(calls)
    times = {n: [] for n in names}
    for n in names:                            # warm-up
        calls[n]()
    common.synchronize(device)
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            common.synchronize(device)
            t0 = time.perf_counter()
            calls[n]()
            common.synchronize(device)
            times[n].append(time.perf_counter() - t0)
        if progress:
            progress(i)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_moe",
                                 description="LoRA on MoE experts: PEFT target_parameters vs fastlora.patch, paired "
                                             "training-step ratios (one MoE layer, a whole model step)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 1 on CPU, 4 on CUDA)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step, one sequence (default 512 on CPU)")
    ap.add_argument("--cases", default="layer,model", help="comma-separated subset of layer,model")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (also FASTLORA_BENCH_TINY=1): a dry run")
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    if a.rounds < 2:
        ap.error(f"--rounds must be >= 2, got {a.rounds}")
    cases_wanted = a.cases.split(",")
    if not set(cases_wanted) <= {"layer", "model"}:
        ap.error(f"--cases: choose from layer,model, got {a.cases}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    s = sizes(device, a.tiny or common.TINY, a.layers, a.tokens)
    models = build(s, device, dtype)
    cases, ids, x = make_cases(models, s, device, dtype)
    worst = check_parity(models, ids, dtype)
    dev = common.device_name(device)
    print(f"{shape_str(s)} on {dev}, {str(dtype).replace('torch.', '')}, {a.rounds} paired rounds; "
          f"fastlora vs PEFT: worst relative error {worst:.2g} (logits, every LoRA gradient)")
    rows = []

    def row(case, provider, metric, value, lo="", hi=""):
        rows.append(dict(bench="moe_lora", case=case, provider=provider, metric=metric, value=f"{value:.6g}",
                         lo=lo if lo == "" else f"{lo:.6g}", hi=hi if hi == "" else f"{hi:.6g}", rounds=a.rounds,
                         shape=shape_str(s), device=dev, dtype=str(dtype).replace("torch.", ""),
                         versions=common.versions(), timestamp=common.timestamp()))
    for case in cases_wanted:
        calls = cases[case]
        params = [p for m in models.values() for p in m.parameters()]
        for p in PROVIDERS:
            mb = saved_bytes(calls[p], params) / 2 ** 20
            row(case, p, "saved_for_backward_MiB", mb)
        times = paired(calls, a.rounds, device)
        print(f"  {case}:")
        for p in PROVIDERS:
            med = common.quantile(times[p], 0.5) * 1e3
            row(case, p, "median_ms", med, common.quantile(times[p], 0.2) * 1e3, common.quantile(times[p], 0.8) * 1e3)
            mb = float(next(r["value"] for r in rows if r["case"] == case and r["provider"] == p
                            and r["metric"] == "saved_for_backward_MiB"))
            print(f"    {p:<10} median {med:9.1f} ms   saved for backward {mb:8.1f} MiB")
        for num, den in (("peft", "fastlora"), ("fastlora", "attn_only")):
            gm, lo, hi = common.ratio_interval([t / u for t, u in zip(times[num], times[den])])
            row(case, f"{num}/{den}", "time_ratio", gm, lo, hi)
            print(f"    {num} / {den} = {gm:.3f} (95% {lo:.3f}-{hi:.3f})")
    path = common.write_csv(f"{common.output_dir(a.out_dir)}/moe_lora_{common.device_tag(device)}.csv", COLUMNS,
                            rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
