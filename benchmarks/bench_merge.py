"""Microbenchmark: merging and unmerging an adapter into the base weight, W0 ← W0 ± s·B·A.

    python -m pytest benchmarks/bench_merge.py --benchmark-only -q      # CSV + PNG in benchmarks/out/

(the output folder: $FASTLORA_BENCH_OUT if set, else benchmarks/out/, git-ignored; benchmarks.common.output_dir)

Providers, same W0 (N, K), A (r, K), B (N, r), s = 2:
    fastlora   fastlora.nn.lora.LoraLinear.merge() / unmerge() — computes the delta in float64 (float32 on
               a half base) and restores W0's exact bytes on unmerge (it records the elements whose
               round trip would not be exact), so it does more work than a bare addmm_
    peft       peft.tuners.lora.Linear.merge() / unmerge()
    torch      W0.addmm_(B, A, alpha=±s): the bare in-place update, the floor
Each round is timed from the opposite state (an untimed setup merges or unmerges first).
Shapes: CPU d = 2048, r = 16, float32; CUDA d ∈ {4096, 8192}, r = 16, bfloat16.
Skipped with a reason when fastlora.nn.lora is absent.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(4096, 16), (8192, 16)] if CUDA else [(2048, 16)]
ROUNDS = int(os.environ.get("FASTLORA_BENCH_ROUNDS", 100 if CUDA else 20))
ALPHA = 32


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _layers(d, r):
    """(fastlora LoraLinear, PEFT lora.Linear, (W, A, B, s) for the bare update), same numbers."""
    from fastlora.nn import lora as modules
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(d, d, generator=g) * 0.02).to(DEVICE, DTYPE)
    A = (torch.randn(r, d, generator=g) * 0.02).to(DEVICE, DTYPE)
    B = (torch.randn(d, r, generator=g) * 0.02).to(DEVICE, DTYPE)
    lins = []
    for _ in range(2):
        lin = nn.Linear(d, d, device=DEVICE, dtype=DTYPE)
        lin.weight.data.copy_(W)
        lins.append(lin)
    fl = modules.LoraLinear.from_linear(lins[0], r, lora_alpha=ALPHA, merge_weights=False)
    with torch.no_grad():
        fl.lora_A.copy_(A)
        fl.lora_B.copy_(B)
    pf = PeftLinear(lins[1], "default", LoraConfig(r=r, lora_alpha=ALPHA), r=r, lora_alpha=ALPHA).to(DEVICE, DTYPE)
    with torch.no_grad():
        pf.lora_A["default"].weight.copy_(A)
        pf.lora_B["default"].weight.copy_(B)
    return fl, pf, (W.clone(), A, B, ALPHA / r)


class _Bare:
    """W0.addmm_(B, A, alpha=±s) with a merged flag, the same interface as the modules."""

    def __init__(self, W, A, B, s):
        self.W, self.A, self.B, self.s, self.merged = W, A, B, s, False

    def merge(self):
        self.W.addmm_(self.B, self.A, alpha=self.s)
        self.merged = True

    def unmerge(self):
        self.W.addmm_(self.B, self.A, alpha=-self.s)
        self.merged = False


@pytest.mark.parametrize("provider", ["fastlora", "peft", "torch"])
@pytest.mark.parametrize("op", ["merge", "unmerge"])
@pytest.mark.parametrize("d,r", SHAPES, ids=lambda v: str(v))
def test_merge(benchmark, record, provider, op, d, r):
    fl, pf, bare = _layers(d, r)
    layer = {"fastlora": fl, "peft": pf, "torch": _Bare(*bare)}[provider]
    w0 = bare[0].clone()
    want_merged_before = op == "unmerge"

    def setup():
        if bool(layer.merged) != want_merged_before:
            layer.unmerge() if layer.merged else layer.merge()
        _sync()

    def fn():
        getattr(layer, op)()
        _sync()

    with torch.no_grad():
        benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if provider == "fastlora" and not layer.merged:      # fastlora's unmerge is exact: W0's bytes back
        assert torch.equal(fl.weight, w0)
    record(benchmark, kernel="lora_merge", provider=provider, mode=op, shape=f"d{d} r{r}",
           dtype=DTYPE, device=DEVICE)
