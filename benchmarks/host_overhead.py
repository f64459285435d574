"""Host time per call of a patched LoRA layer and of fastlora.LoraLinear vs PEFT's, at a shape so small that the time
is all Python and dispatch (the cost a GPU run pays on the CPU before the first kernel launches).

    python -m benchmarks.host_overhead [--rounds 200] [--threads 1] [--out-dir DIR]

One PEFT model with a single LoRA nn.Linear(64, 64), r 8; a deepcopy of it given to fastlora.patch; and the same
base layer and adapter weights as a fastlora.LoraLinear in the same one-layer model. x is (4, 64, 64) float32 on the
CPU (torch backend: TRITON_INTERPRET unset). Modes: eval under no_grad, and a training step (forward + backward of
y.sum()) at lora_dropout 0 and 0.1. The three models run in turn within each round (the order rotating); medians in
µs, with the ratios fastlora / PEFT and LoraLinear / PEFT. Writes host_overhead_cpu.csv to the output folder.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from benchmarks import common

COLUMNS = ("mode", "dropout", "peft_us", "fastlora_us", "ratio", "module_us", "module_ratio", "rounds", "threads",
           "device", "versions")
PROVIDERS = ("peft", "fastlora", "module")


class _One(nn.Module):
    def __init__(self, q=None):
        super().__init__()
        self.q = q if q is not None else nn.Linear(64, 64)

    def forward(self, x):
        return self.q(x)


def models(p: float) -> dict[str, nn.Module]:
    """PEFT's model, its patched copy, and the same layer as a fastlora.LoraLinear (same weights)."""
    import fastlora
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    peft = get_peft_model(_One(), LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["q"]))
    with torch.no_grad():                  # B random, not PEFT's zeros: the three models' LoRA terms can be compared
        nn.init.normal_(peft.base_model.model.q.lora_B["default"].weight, std=0.1)
    fused = copy.deepcopy(peft)
    fastlora.patch(fused, warn=False)
    layer = peft.base_model.model.q
    module = fastlora.LoraLinear.from_linear(copy.deepcopy(layer.base_layer), r=8, lora_alpha=16, lora_dropout=p,
                                             merge_weights=False)
    with torch.no_grad():
        module.lora_A.copy_(layer.lora_A["default"].weight)
        module.lora_B.copy_(layer.lora_B["default"].weight)
    return {"peft": peft, "fastlora": fused, "module": _One(module)}


def measure(rounds: int = 200, warmup: int = 20) -> list[dict]:
    rows = []
    x = torch.randn(4, 64, 64, requires_grad=True)
    for p in (0.0, 0.1):
        ms = models(p)
        for mode in ("eval", "train"):
            for m in ms.values():
                m.train(mode == "train")

            def call(m):
                if mode == "eval":
                    with torch.no_grad():
                        m(x)
                else:
                    m(x).sum().backward()
            times = {k: [] for k in PROVIDERS}
            order = list(PROVIDERS)
            for i in range(warmup + rounds):
                order = order[1:] + order[:1]
                for name in order:
                    t0 = time.perf_counter()
                    call(ms[name])
                    if i >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(dict(mode=mode, dropout=p, peft_us=round(med["peft"], 1), fastlora_us=round(med["fastlora"], 1),
                             ratio=round(med["fastlora"] / med["peft"], 3), module_us=round(med["module"], 1),
                             module_ratio=round(med["module"] / med["peft"], 3), rounds=rounds,
                             threads=torch.get_num_threads(), device=common.cpu_name(), versions=common.versions()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.threads < 1:
        ap.error(f"--rounds and --threads must be >= 1, got {a.rounds}, {a.threads}")
    torch.set_num_threads(a.threads)
    rows = measure(a.rounds, warmup=min(20, a.rounds))
    for r in rows:
        print(f"{r['mode']:<5} p={r['dropout']}: PEFT {r['peft_us']:8.1f} us  fastlora {r['fastlora_us']:8.1f} us "
              f"(ratio {r['ratio']:.3f})  LoraLinear {r['module_us']:8.1f} us (ratio {r['module_ratio']:.3f})")
    path = common.write_csv(common.output_dir(a.out_dir) / "host_overhead_cpu.csv", COLUMNS, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
