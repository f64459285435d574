"""Host time per call of a patched LoRA layer vs PEFT's, at a shape so small that the time is all Python and
dispatch (the cost a GPU run pays on the CPU before the first kernel launches).

    python -m benchmarks.host_overhead [--rounds 200] [--out-dir DIR]

One PEFT model with a single LoRA nn.Linear(64, 64), r 8, and a deepcopy of it given to fastlora.patch; x is
(4, 64, 64) float32 on the CPU (torch backend: TRITON_INTERPRET unset). Modes: eval under no_grad, and a training
step (forward + backward of y.sum()) at lora_dropout 0 and 0.1. The two models alternate call by call; medians
in µs, with the ratio fastlora / PEFT. Writes host_overhead_cpu.csv to the output folder.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from benchmarks import common

COLUMNS = ("mode", "dropout", "peft_us", "fastlora_us", "ratio", "rounds", "threads", "device", "versions")


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 64)

    def forward(self, x):
        return self.q(x)


def measure(rounds: int = 200, warmup: int = 20) -> list[dict]:
    import fastlora
    from peft import LoraConfig, get_peft_model
    rows = []
    x = torch.randn(4, 64, 64, requires_grad=True)
    for p in (0.0, 0.1):
        torch.manual_seed(0)
        peft = get_peft_model(_One(), LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["q"]))
        fused = copy.deepcopy(peft)
        fastlora.patch(fused, warn=False)
        for mode in ("eval", "train"):
            for m in (peft, fused):
                m.train(mode == "train")

            def call(m):
                if mode == "eval":
                    with torch.no_grad():
                        m(x)
                else:
                    m(x).sum().backward()
            times = {"peft": [], "fastlora": []}
            for i in range(warmup + rounds):
                for name, m in (("peft", peft), ("fastlora", fused)):
                    t0 = time.perf_counter()
                    call(m)
                    if i >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e6)
            a, b = statistics.median(times["peft"]), statistics.median(times["fastlora"])
            rows.append(dict(mode=mode, dropout=p, peft_us=round(a, 1), fastlora_us=round(b, 1),
                             ratio=round(b / a, 3), rounds=rounds, threads=torch.get_num_threads(),
                             device=common.cpu_name(), versions=common.versions()))
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
    rows = measure(a.rounds)
    for r in rows:
        print(f"{r['mode']:<5} p={r['dropout']}: PEFT {r['peft_us']:8.1f} us  fastlora {r['fastlora_us']:8.1f} us  "
              f"ratio {r['ratio']:.3f}")
    path = common.write_csv(common.output_dir(a.out_dir) / "host_overhead_cpu.csv", COLUMNS, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
