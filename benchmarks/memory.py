"""Memory benchmark: what one LoRA linear layer keeps alive for backward, fastlora vs PEFT (and loralib).

    python -m benchmarks.memory                  # CPU: d 2048, r 16, 512 tokens, float32
    python -m benchmarks.memory --device cuda    # also peak CUDA memory of forward+backward

Saved bytes are counted with torch.autograd.graph.saved_tensors_hooks during a training forward
(x requires grad, as for a layer inside a network; W0 and bias frozen), deduplicated by storage,
and split into: the layer's parameters and x itself (alive anyway, not extra memory) and the
rest ("extra": activations the layer adds, e.g. dropout(x) and its mask). Peak CUDA memory is
torch.cuda.max_memory_allocated over forward+backward minus what was allocated before.
CSV and PNG go to the output folder (benchmarks/out/ unless --out-dir; benchmarks.common.output_dir).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import fastlora

from . import common

CSV_COLUMNS = ("provider", "case", "M", "d", "r", "p", "saved_bytes", "saved_mib", "extra_bytes",
               "extra_x_sized", "peak_cuda_bytes", "device", "dtype", "versions", "timestamp")


def saved_bytes(fn, alive: list[torch.Tensor]) -> tuple[int, int]:
    """(all bytes saved for backward by ``fn()``, bytes not belonging to the ``alive`` tensors).

    Storages are counted once each (a tensor and its views share one storage).
    """
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    keep = {t.untyped_storage().data_ptr() for t in alive}
    del out
    return sum(seen.values()), sum(n for p, n in seen.items() if p not in keep)


def make_providers(M: int, d: int, r: int, p: float, device, dtype):
    """{name: (forward(x) -> y, tensors alive anyway)} over shared W0, bias, A, B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    import loralib
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device, dtype)   # noqa: E731
    W, bias = mk(d, d), mk(d)
    A, B = mk(r, d).requires_grad_(True), mk(d, r).requires_grad_(True)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    base.weight.data.copy_(W)
    base.bias.data.copy_(bias)
    peft = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r,
                      lora_alpha=2 * r, lora_dropout=p).to(device, dtype).train()
    ll = loralib.Linear(d, d, r=r, lora_alpha=2 * r, lora_dropout=p, merge_weights=False).to(device, dtype)
    ll.weight.requires_grad_(False)
    ll.bias.requires_grad_(False)
    ll.train()
    return {
        "base GEMM": (lambda x: torch.nn.functional.linear(x, W, bias), [W, bias]),
        "fastlora": (lambda x: fastlora.lora_linear(x, W, bias, A, B, 2.0, p, True), [W, bias, A, B]),
        "peft": (peft, list(peft.parameters())),
        "loralib": (ll, list(ll.parameters())),
    }


def measure(M=512, d=2048, r=16, ps=(0.0, 0.1), device="cpu", dtype=torch.float32) -> list[dict]:
    device = torch.device(device)
    vers, stamp, name = common.versions(), common.timestamp(), common.device_name(device)
    x_bytes = M * d * torch.empty((), dtype=dtype).element_size()
    rows = []
    for p in ps:
        for prov, (fn, params) in make_providers(M, d, r, p, device, dtype).items():
            if prov == "base GEMM" and p > 0:
                continue
            x = torch.randn(M, d, device=device, dtype=dtype, requires_grad=True)
            total, extra = saved_bytes(lambda: fn(x), params + [x])
            peak = ""
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                fn(x).backward(torch.ones(M, d, device=device, dtype=dtype))
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(device) - before
            rows.append(dict(provider=prov, case=f"p={p}", M=M, d=d, r=r, p=p, saved_bytes=total,
                             saved_mib=f"{total / 2**20:.3f}", extra_bytes=extra,
                             extra_x_sized=f"{extra / x_bytes:.3f}", peak_cuda_bytes=peak, device=name,
                             dtype=str(dtype).replace("torch.", ""), versions=vers, timestamp=stamp))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--r", type=int, default=16)
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        ap.error(f"--device must be 'cpu' or 'cuda[:index]', got {a.device!r}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device {a.device}: use cpu, or cuda on a machine with CUDA")
    cuda = device.type == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    M, d = a.tokens or (4096 if cuda else 512), a.d or (4096 if cuda else 2048)
    for name, v in (("--tokens", M), ("--d", d), ("--r", a.r)):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    rows = measure(M, d, a.r, device=device, dtype=dtype)
    print(f"saved for backward per layer, M={M} d={d} r={a.r} {dtype} on {rows[0]['device']}")
    print("(extra = beyond the parameters and x itself; in units of one x-sized tensor)")
    for r in rows:
        peak = f"   peak {int(r['peak_cuda_bytes']) / 2**20:8.1f} MiB" if r["peak_cuda_bytes"] != "" else ""
        print(f"  {r['case']:<7} {r['provider']:<10} total {float(r['saved_mib']):8.2f} MiB   "
              f"extra {r['extra_bytes'] / 2**20:8.2f} MiB = {r['extra_x_sized']} × x{peak}")
    from . import plot
    path = common.write_csv(common.output_dir(a.out_dir) / f"memory_{common.device_tag(device)}.csv", CSV_COLUMNS, rows)
    print(f"wrote {path} and {plot.plot_csv(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
