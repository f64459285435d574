"""Traffic / FLOP / launch MODEL of one LoRA linear layer, per implementation. Nothing here is measured.

    python -m benchmarks.traffic          # prints the model and writes benchmarks/results/traffic_model.csv

Layer: x (M, K) · W0 (N, K) · bias (N,) · A (r, K) · B (N, r), activations and weights in
``b`` bytes per element (bf16: 2), adapters in ``ba`` bytes, S = dropout(x)·Aᵀ (M, r) kept in
fp32 by fastlora. Each implementation is a list of kernels; each kernel has the bytes it must
move through HBM (compulsory traffic: every operand read once, every result written once — an
ideal tiled kernel; re-reads of tiles that miss L2 are not modelled, for any implementation) and
its FLOPs. Modelled time of a kernel = max(bytes / peak bandwidth, FLOPs / peak tensor
throughput) (a roofline at peak, no efficiency factor); of an implementation = the sum over its
kernels + launches × LAUNCH_US. Padded ranks: tl.dot needs r padded to ≥ 16 (power of two).

Dropout p > 0 means a training forward: PEFT and the composite materialise dropout(x) and a
bool mask (1 byte per element, saved for backward); fastlora regenerates the mask (Philox) and
saves S instead.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from . import common

# Peak figures, dense (no 2:4 sparsity), from the vendor datasheets:
#   NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5 80GB): HBM3 3.35 TB/s; BF16/FP16 tensor 989.4 TFLOPS dense
#   NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): HBM2e 2,039 GB/s; BF16/FP16 tensor 312 TFLOPS dense
GPUS = {
    "H100 SXM": dict(bw=3.35e12, flops=989.4e12, source="NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989.4 TFLOPS BF16 dense"),
    "A100 80GB": dict(bw=2.039e12, flops=312e12, source="NVIDIA A100 datasheet: 2,039 GB/s HBM2e, 312 TFLOPS BF16 dense"),
}
# Assumption (not a datasheet figure): host-side cost of one eager PyTorch kernel launch, µs.
LAUNCH_US = 4.0
BN = 128           # fastlora one-launch N-tile width: the shrink is recomputed once per N tile


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float


@dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int
    p: float = 0.0       # LoRA dropout (training forward when > 0)
    b: int = 2           # bytes per activation / base-weight element
    ba: int = 2          # bytes per adapter element

    @property
    def rp(self) -> int:
        """r padded to a tl.dot-legal block (>= 16, power of two)."""
        return max(16, 1 << (self.r - 1).bit_length())


def base_gemm(s: Shape) -> list[Kernel]:
    """y = x·W0ᵀ + bias, one cuBLAS GEMM (the floor every implementation is compared with)."""
    M, K, N, b = s.M, s.K, s.N, s.b
    return [Kernel("addmm", (M * K + N * K + N + M * N) * b, 2 * M * N * K)]


def _dropout(s: Shape) -> list[Kernel]:
    # reads x, writes dropout(x) and the bool mask (saved for backward)
    return [Kernel("dropout", s.M * s.K * (2 * s.b + 1), s.M * s.K)] if s.p > 0 else []


def peft_fwd(s: Shape) -> list[Kernel]:
    """PEFT lora.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling — one kernel per op."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return base_gemm(s) + _dropout(s) + [
        Kernel("lora_A", M * K * b + r * K * ba + M * r * b, 2 * M * K * r),
        Kernel("lora_B", M * r * b + N * r * ba + M * N * b, 2 * M * N * r),
        Kernel("mul scaling", 2 * M * N * b, M * N),
        Kernel("add", 3 * M * N * b, M * N)]


def composite_fwd(s: Shape) -> list[Kernel]:
    """Torch composite: y = addmm(bias, x, W0ᵀ); S = dropout(x)·Aᵀ; y.addmm_(S, Bᵀ, alpha=s)."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return base_gemm(s) + _dropout(s) + [
        Kernel("S = x·Aᵀ", M * K * b + r * K * ba + M * r * b, 2 * M * K * r),
        Kernel("y.addmm_", M * r * b + N * r * ba + 2 * M * N * b, 2 * M * N * r)]


def fastlora_fwd_one(s: Shape) -> list[Kernel]:
    """One launch: S accumulated in the base GEMM's K-loop (recomputed per N tile), expand in the epilogue."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    save_s = M * r * 4 if s.p > 0 else 0
    flops = 2 * M * N * K + 2 * M * K * s.rp * math.ceil(N / BN) + 2 * M * N * s.rp
    return [Kernel("fused gemm+lora", (M * K + N * K + N + M * N) * b + (r * K + N * r) * ba + save_s, flops)]


def fastlora_fwd_two(s: Shape) -> list[Kernel]:
    """Two launches: a shrink kernel writes S (M×r fp32); the GEMM epilogue reads it."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return [Kernel("shrink", M * K * b + r * K * ba + M * r * 4, 2 * M * K * s.rp),
            Kernel("gemm+expand", (M * K + N * K + N + M * N) * b + M * r * 4 + N * r * ba,
                   2 * M * N * K + 2 * M * N * s.rp)]


def fastlora_bwd(s: Shape) -> list[Kernel]:
    """(1) dS = s·dY·B, dB = s·dYᵀ·S, dbias in one pass over dY; (2) dX GEMM with (dS·A)⊙mask in the
    epilogue, dA = dSᵀ·drop(x) on the same (M, K) tiles (x read once, mask regenerated)."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return [Kernel("dS,dB,dbias", M * N * b + N * r * ba + M * r * 4 + M * r * 4 + N * r * ba + N * b,
                   4 * M * N * s.rp + M * N),
            Kernel("dX+dA", M * N * b + N * K * b + M * r * 4 + r * K * ba + M * K * b + M * K * b + r * K * ba,
                   2 * M * N * K + 4 * M * K * s.rp)]


def _lora_bwd_chain(s: Shape, first: list[Kernel]) -> list[Kernel]:
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    drop = [Kernel("dropout bwd", M * K * (2 * b + 1), M * K)] if s.p > 0 else []
    return first + [
        Kernel("dxd = dt·A", M * r * b + r * K * ba + M * K * b, 2 * M * K * r),
        Kernel("dA = dtᵀ·xd", M * r * b + M * K * b + r * K * ba, 2 * M * K * r)] + drop + [
        Kernel("dX = dY·W0", M * N * b + N * K * b + M * K * b, 2 * M * N * K),
        Kernel("dbias", M * N * b + N * b, M * N),
        Kernel("dX accumulate", 3 * M * K * b, M * K)]


def peft_bwd(s: Shape) -> list[Kernel]:
    """Autograd through PEFT's chain: mul-by-scaling, two linears, dropout, base linear, grad accumulation."""
    M, N, r, b, ba = s.M, s.N, s.r, s.b, s.ba
    return _lora_bwd_chain(s, [
        Kernel("grad·scaling", 2 * M * N * b, M * N),
        Kernel("dt = g·B", M * N * b + N * r * ba + M * r * b, 2 * M * N * r),
        Kernel("dB = gᵀ·t", M * N * b + M * r * b + N * r * ba, 2 * M * N * r)])


def composite_bwd(s: Shape) -> list[Kernel]:
    """Autograd through the composite: addmm_ backward gives dS and dB (each an mm and an alpha mul)."""
    M, N, r, b, ba = s.M, s.N, s.r, s.b, s.ba
    return _lora_bwd_chain(s, [
        Kernel("dS = dY·B", M * N * b + N * r * ba + M * r * b, 2 * M * N * r),
        Kernel("dS *= s", 2 * M * r * b, M * r),
        Kernel("dB = dYᵀ·S", M * N * b + M * r * b + N * r * ba, 2 * M * N * r),
        Kernel("dB *= s", 2 * N * r * ba, N * r)])


IMPLS = {
    ("fwd", "base GEMM"): base_gemm, ("fwd", "PEFT"): peft_fwd, ("fwd", "torch composite"): composite_fwd,
    ("fwd", "fastlora 1-launch"): fastlora_fwd_one, ("fwd", "fastlora 2-launch"): fastlora_fwd_two,
    ("bwd", "PEFT"): peft_bwd, ("bwd", "torch composite"): composite_bwd, ("bwd", "fastlora"): fastlora_bwd,
}


def multi_adapter(M: int, K: int, N: int, ranks: list[int], b: int = 2,
                  packed: bool = True) -> tuple[list[Kernel], float]:
    """LoRA part of a multi-adapter batch (base GEMM excluded): tokens spread evenly over adapters.

    padded: every adapter stored and computed at r_max (a (T, r_max, K) bank); packed: each at its
    own rank, offsets per adapter. Shrink (gather-matmul writing S) + expand in the GEMM epilogue.
    Returns (kernels, bytes of the adapter bank).
    """
    T = len(ranks)
    rs = ranks if packed else [max(ranks)] * T
    sum_r_tok = M / T * sum(rs)                       # Σ over tokens of the rank its adapter uses
    w = sum(rs) * (K + N) * b                         # bank bytes read
    return [Kernel("shrink (gather)", M * K * b + sum(rs) * K * b + sum_r_tok * 4, 2 * sum_r_tok * K),
            Kernel("expand (epilogue)", sum_r_tok * 4 + sum(rs) * N * b, 2 * sum_r_tok * N)], w


def totals(kernels: list[Kernel], gpu: str) -> dict:
    """bytes, FLOPs, launches and the modelled time (µs) of a kernel list on ``gpu``."""
    g = GPUS[gpu]
    t = sum(max(k.bytes / g["bw"], k.flops / g["flops"]) for k in kernels) * 1e6 + LAUNCH_US * len(kernels)
    return dict(bytes=sum(k.bytes for k in kernels), flops=sum(k.flops for k in kernels),
                launches=len(kernels), model_time_us=t)


CSV_COLUMNS = ("label", "gpu", "case", "impl", "direction", "M", "K", "N", "r", "p", "dtype_bytes",
               "bytes", "gflops", "launches", "model_time_us", "source", "launch_us_assumed")

MULTI_RANKS = [4, 8, 16, 64] * 4     # 16 adapters of mixed rank for the padded-vs-packed comparison
CASES = [  # (case name, Shape): the fused-LoRA papers' GPU shapes and GPT-2 medium's c_attn at batch 1
    ("d4096 r16 M4096 p0", Shape(4096, 4096, 4096, 16, 0.0)),
    ("d4096 r16 M4096 p0.1", Shape(4096, 4096, 4096, 16, 0.1)),
    ("d8192 r16 M4096 p0.1", Shape(4096, 8192, 8192, 16, 0.1)),
    ("gpt2-m c_attn b1 s128", Shape(128, 1024, 3072, 4, 0.0)),
]


def model_rows(cases=CASES) -> list[dict]:
    rows = []
    for gpu in GPUS:
        for case, s in cases:
            for (direction, impl), fn in IMPLS.items():
                tot = totals(fn(s), gpu)
                rows.append(dict(label="model", gpu=gpu, case=case, impl=f"{direction} {impl}",
                                 direction=direction, M=s.M, K=s.K, N=s.N, r=s.r, p=s.p, dtype_bytes=s.b,
                                 bytes=int(tot["bytes"]), gflops=f"{tot['flops'] / 1e9:.3f}",
                                 launches=tot["launches"], model_time_us=f"{tot['model_time_us']:.2f}",
                                 source=GPUS[gpu]["source"], launch_us_assumed=LAUNCH_US))
        for packed in (False, True):
            ks, _ = multi_adapter(4096, 4096, 4096, MULTI_RANKS, packed=packed)
            tot = totals(ks, gpu)
            rows.append(dict(label="model", gpu=gpu, case="multi-adapter 16 adapters r 4/8/16/64",
                             impl=f"fwd lora part {'packed' if packed else 'padded'}", direction="fwd",
                             M=4096, K=4096, N=4096, r=max(MULTI_RANKS), p=0.0, dtype_bytes=2,
                             bytes=int(tot["bytes"]), gflops=f"{tot['flops'] / 1e9:.3f}",
                             launches=tot["launches"], model_time_us=f"{tot['model_time_us']:.2f}",
                             source=GPUS[gpu]["source"], launch_us_assumed=LAUNCH_US))
    return rows


def main(argv=None) -> int:
    rows = model_rows()
    print("MODEL (not a measurement): per-layer HBM bytes, FLOPs, launches, modelled time "
          f"= Σ max(bytes/BW, FLOPs/peak) + launches × {LAUNCH_US} µs (assumed)")
    for gpu in GPUS:
        print(f"\n[model] {gpu}: {GPUS[gpu]['source']}")
        for case, _ in CASES:
            print(f"  {case}")
            for r in (r for r in rows if r["gpu"] == gpu and r["case"] == case):
                print(f"    {r['impl']:<26}{r['bytes'] / 2**20:>10.1f} MiB{float(r['gflops']):>10.2f} GFLOP"
                      f"{r['launches']:>4} launches{float(r['model_time_us']):>10.1f} µs (model)")
    print("\n[model] multi-adapter LoRA part, M=4096, d=4096, ranks 4/8/16/64 (x4 adapters each), bf16:")
    for packed in (False, True):
        ks, wbytes = multi_adapter(4096, 4096, 4096, MULTI_RANKS, packed=packed)
        t = totals(ks, "H100 SXM")
        print(f"    {'packed' if packed else 'padded':<8} bank {wbytes / 2**20:7.1f} MiB, "
              f"{t['bytes'] / 2**20:7.1f} MiB moved, {t['flops'] / 1e9:7.2f} GFLOP, "
              f"{t['model_time_us']:7.1f} µs on H100 SXM (model)")
    path = common.write_csv(common.RESULTS_DIR / "traffic_model.csv", CSV_COLUMNS, rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
