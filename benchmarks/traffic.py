"""Traffic / FLOP / launch MODEL of one LoRA linear layer, per implementation. Nothing here is measured.

    python -m benchmarks.traffic          # prints the model, its predictions for the GPU targets, and writes
                                          # traffic_model.csv to the output folder (benchmarks/out/ by default)

Layer: x (M, K) · W0 (N, K) · bias (N,) · A (r, K) · B (N, r), activations and weights in
``b`` bytes per element (bf16: 2), adapters in ``ba`` bytes, S = dropout(x)·Aᵀ (M, r) kept in
fp32 by fastlora. Each implementation is a list of kernels; each kernel has the bytes it must
move through HBM (compulsory traffic: every operand read once, every result written once — an
ideal tiled kernel; re-reads of tiles that miss L2 are not modelled, for any implementation), its
FLOPs and its kind: "gemm" (a cuBLAS GEMM) or "mem" (a memory-bound kernel: elementwise ops,
skinny rank-r products, fastlora's Triton prologue kernels).

Modelled time of a kernel = max(bytes / (peak bandwidth · bw_eff), FLOPs / (peak tensor throughput ·
eff)), eff = gemm_eff for "gemm" kernels and 1 otherwise; of an implementation = the sum over its
kernels (+ launches × LAUNCH_US for eager). Two settings:
  peak   bw_eff = gemm_eff = 1 (the roofline; column model_time_us, launches included)
  eff    gemm_eff = GEMM_EFF for every cuBLAS GEMM alike (the base GEMM, PEFT's, the anchored plan's
         addmm_), bw_eff = BW_EFF for every kernel (columns kernel_us_eff: kernels only, as under CUDA
         graphs; eager_us_eff: + launches). The targets are predicted with this setting.
Padded ranks: tl.dot needs r padded to ≥ 16 (power of two).

fastlora's anchored plan (the default on CUDA): forward = Triton shrink (reads x, A; writes S fp32), Triton
expand (reads S, B, bias; writes y0 = s·S·Bᵀ + bias, M×N), cuBLAS y.addmm_(x, W0ᵀ) (reads x, W0 and y0, writes
y); backward = Triton dS/dB pass (reads dY, B, S; writes dS, dB), Triton dx prologue (reads dS, A, x; writes
dx0 = (dS·A)⊙keep/(1−p) and dA), cuBLAS dx.addmm_(dY, W0) (reads dY, W0, dx0; writes dx). dA's per-row-block
partial sums (atomics) go to L2 and are not counted. Dropout p > 0 means a training forward: PEFT and the
composite materialise dropout(x) and a bool mask (1 byte per element, saved for backward); fastlora
regenerates the mask (Philox) in its kernels and saves S instead.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from . import common

# Peak figures, dense (no 2:4 sparsity), from the vendor datasheets:
#   NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5 80GB): HBM3 3.35 TB/s; BF16/FP16 tensor 989.4 TFLOPS dense
#   NVIDIA H200 Tensor Core GPU datasheet (H200 SXM 141GB): HBM3e 4.8 TB/s; BF16 1,979 TFLOPS with sparsity = 989.5 dense
#   NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): HBM2e 2,039 GB/s; BF16/FP16 tensor 312 TFLOPS dense
# sms: streaming multiprocessors (H100 SXM5 and H200 SXM: 132; A100: 108), for the program counts.
GPUS = {
    "H100 SXM": dict(bw=3.35e12, flops=989.4e12, sms=132,
                     source="NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989.4 TFLOPS BF16 dense"),
    "H200 SXM": dict(bw=4.8e12, flops=989.5e12, sms=132,
                     source="NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989.5 TFLOPS BF16 dense"),
    "A100 80GB": dict(bw=2.039e12, flops=312e12, sms=108,
                      source="NVIDIA A100 datasheet: 2,039 GB/s HBM2e, 312 TFLOPS BF16 dense"),
}
# Assumption (not a datasheet figure): host-side cost of one eager PyTorch kernel launch, µs.
LAUNCH_US = 4.0
# Fraction of peak tensor throughput a cuBLAS GEMM reaches: what the base GEMM (bf16, 4096 tokens, d 4096) reached
# on the one GPU run (docs/benchmarks.md, "Traffic / FLOP model", gives the measurement and its source); applied
# to every cuBLAS GEMM of every implementation alike ("cuBLAS-equivalent").
GEMM_EFF = 0.78
# Assumption: fraction of peak HBM bandwidth a streaming kernel reaches (any implementation's).
BW_EFF = 0.8
# Column tiles assumed for the program counts (the half-precision candidates of kernels/policy.py when this was
# written, which use row blocks of 16 to 128; the launch policy may choose others). The dS/dB pass splits dY's
# columns in multiples of 256 until there are ~2 programs per SM (kernels/linear_bwd.py _split_n).
PROLOGUE_COLS = {"expand": 128, "dx prologue": 128}
SPLIT_N_COLS = 256


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float
    kind: str = "mem"         # "gemm": cuBLAS GEMM (efficiency gemm_eff); "mem": memory-bound


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
    return [Kernel("addmm", (M * K + N * K + N + M * N) * b, 2 * M * N * K, "gemm")]


def base_bwd(s: Shape) -> list[Kernel]:
    """dx = dY·W0 of the frozen base layer, one cuBLAS GEMM."""
    M, K, N, b = s.M, s.K, s.N, s.b
    return [Kernel("dX = dY·W0", (M * N + N * K + M * K) * b, 2 * M * N * K, "gemm")]


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


def anchored_fwd(s: Shape) -> list[Kernel]:
    """fastlora's anchored plan: Triton shrink and expand write the LoRA term into y, cuBLAS accumulates onto it."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return [Kernel("shrink (Triton)", M * K * b + r * K * ba + M * r * 4, 2 * M * K * s.rp),
            Kernel("expand (Triton)", M * r * 4 + N * r * ba + N * b + M * N * b, 2 * M * N * s.rp),
            Kernel("y.addmm_ (cuBLAS)", (M * K + N * K + 2 * M * N) * b, 2 * M * N * K, "gemm")]


def anchored_bwd(s: Shape) -> list[Kernel]:
    """dS = s·dY·B, dB = s·dYᵀ·S in one pass over dY; dx0 = (dS·A)⊙keep/(1−p) and dA = dSᵀ·drop(x) from the same x
    rows (mask regenerated); cuBLAS dx.addmm_(dY, W0) onto dx0."""
    M, K, N, r, b, ba = s.M, s.K, s.N, s.r, s.b, s.ba
    return [Kernel("dS,dB (Triton)", M * N * b + N * r * ba + M * r * 4 + M * r * 4 + N * r * ba, 4 * M * N * s.rp),
            Kernel("dx prologue+dA (Triton)", M * r * 4 + r * K * ba + M * K * b + M * K * b + r * K * ba,
                   4 * M * K * s.rp),
            Kernel("dx.addmm_ (cuBLAS)", (M * N + N * K + 2 * M * K) * b, 2 * M * N * K, "gemm")]


def _lora_bwd_chain(s: Shape, first: list[Kernel]) -> list[Kernel]:
    M, K, r, b, ba = s.M, s.K, s.r, s.b, s.ba
    drop = [Kernel("dropout bwd", M * K * (2 * b + 1), M * K)] if s.p > 0 else []
    return first + [
        Kernel("dxd = dt·A", M * r * b + r * K * ba + M * K * b, 2 * M * K * r),
        Kernel("dA = dtᵀ·xd", M * r * b + M * K * b + r * K * ba, 2 * M * K * r)] + drop + base_bwd(s) + [
        Kernel("dX accumulate", 3 * M * K * b, M * K)]


def peft_bwd(s: Shape) -> list[Kernel]:
    """Autograd through PEFT's chain (W0 and bias frozen): mul-by-scaling, two linears, dropout, base linear,
    grad accumulation."""
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
    ("fwd", "fastlora anchored"): anchored_fwd,
    ("bwd", "base GEMM"): base_bwd, ("bwd", "PEFT"): peft_bwd, ("bwd", "torch composite"): composite_bwd,
    ("bwd", "fastlora anchored"): anchored_bwd,
}


def multi_adapter(M: int, K: int, N: int, ranks: list[int], b: int = 2,
                  packed: bool = True) -> tuple[list[Kernel], float]:
    """LoRA part of a multi-adapter batch (the base GEMM, which accumulates onto y0, excluded): tokens spread
    evenly over adapters.

    padded: every adapter stored and computed at r_max (a (T, r_max, K) bank); packed: each at its
    own rank, offsets per adapter. Gather shrink (writes S) + gather expand (writes y0 = the LoRA term).
    Returns (kernels, bytes of the adapter bank).
    """
    T = len(ranks)
    rs = ranks if packed else [max(ranks)] * T
    sum_r_tok = M / T * sum(rs)                       # Σ over tokens of the rank its adapter uses
    w = sum(rs) * (K + N) * b                         # bank bytes read
    return [Kernel("shrink (gather)", M * K * b + sum(rs) * K * b + sum_r_tok * 4, 2 * sum_r_tok * K),
            Kernel("expand (gather, writes y0)", sum_r_tok * 4 + sum(rs) * N * b + M * N * b, 2 * sum_r_tok * N)], w


def totals(kernels: list[Kernel], gpu: str, gemm_eff: float = 1.0, bw_eff: float = 1.0) -> dict:
    """bytes, FLOPs, launches and modelled times (µs) of a kernel list on ``gpu``: kernel_us (kernels only, as
    under CUDA graphs) and model_time_us (+ launches × LAUNCH_US, eager). Defaults: the roofline at peak."""
    g = GPUS[gpu]
    t = sum(max(k.bytes / (g["bw"] * bw_eff), k.flops / (g["flops"] * (gemm_eff if k.kind == "gemm" else 1.0)))
            for k in kernels) * 1e6
    return dict(bytes=sum(k.bytes for k in kernels), flops=sum(k.flops for k in kernels),
                launches=len(kernels), kernel_us=t, model_time_us=t + LAUNCH_US * len(kernels))


def effective(kernels: list[Kernel], gpu: str) -> dict:
    """totals() at the stated efficiencies (GEMM_EFF for cuBLAS GEMMs, BW_EFF for every kernel)."""
    return totals(kernels, gpu, GEMM_EFF, BW_EFF)


def programs(M: int, K: int, N: int, r: int, sms: int, block_m: int = 64) -> dict[str, int]:
    """Programs (CTAs) each anchored-plan Triton kernel launches for M tokens, ``block_m`` rows per program:
    shrink one per row block and rank block (≤ 64 ranks), expand / dx prologue one per (row block, column tile of
    PROLOGUE_COLS), dS/dB one per row block and split of dY's columns (up to ~2 per SM)."""
    rows, rb = math.ceil(M / block_m), math.ceil(r / 64)
    split = max(1, min(math.ceil(2 * sms / (rows * rb)), math.ceil(N / SPLIT_N_COLS)))
    return {"shrink": rows * rb, "expand": rows * math.ceil(N / PROLOGUE_COLS["expand"]),
            "dS/dB": rows * rb * split, "dx prologue": rows * math.ceil(K / PROLOGUE_COLS["dx prologue"])}


CSV_COLUMNS = ("label", "gpu", "case", "impl", "direction", "M", "K", "N", "r", "p", "dtype_bytes",
               "bytes", "gflops", "launches", "model_time_us", "kernel_us_eff", "eager_us_eff", "gemm_eff",
               "bw_eff", "source", "launch_us_assumed")

MULTI_RANKS = [4, 8, 16, 64] * 4     # 16 adapters of mixed rank for the padded-vs-packed comparison
CASES = [  # (case name, Shape): LoRAFusion's GPU shapes, a small host-bound shape, GPT-2 medium's c_attn at batch 1
    ("d4096 r16 M4096 p0", Shape(4096, 4096, 4096, 16, 0.0)),
    ("d4096 r16 M4096 p0.1", Shape(4096, 4096, 4096, 16, 0.1)),
    ("d8192 r16 M4096 p0", Shape(4096, 8192, 8192, 16, 0.0)),
    ("d8192 r16 M4096 p0.1", Shape(4096, 8192, 8192, 16, 0.1)),
    ("d1024 r16 M128 p0.1", Shape(128, 1024, 1024, 16, 0.1)),
    ("gpt2-m c_attn b1 s128", Shape(128, 1024, 3072, 4, 0.0)),
]


def _row(gpu, case, impl, direction, s: Shape, kernels) -> dict:
    tot, eff = totals(kernels, gpu), effective(kernels, gpu)
    return dict(label="model", gpu=gpu, case=case, impl=impl, direction=direction, M=s.M, K=s.K, N=s.N, r=s.r,
                p=s.p, dtype_bytes=s.b, bytes=int(tot["bytes"]), gflops=f"{tot['flops'] / 1e9:.3f}",
                launches=tot["launches"], model_time_us=f"{tot['model_time_us']:.2f}",
                kernel_us_eff=f"{eff['kernel_us']:.2f}", eager_us_eff=f"{eff['model_time_us']:.2f}",
                gemm_eff=GEMM_EFF, bw_eff=BW_EFF, source=GPUS[gpu]["source"], launch_us_assumed=LAUNCH_US)


def model_rows(cases=CASES) -> list[dict]:
    rows = []
    for gpu in GPUS:
        for case, s in cases:
            for (direction, impl), fn in IMPLS.items():
                rows.append(_row(gpu, case, f"{direction} {impl}", direction, s, fn(s)))
        for packed in (False, True):
            ks, _ = multi_adapter(4096, 4096, 4096, MULTI_RANKS, packed=packed)
            rows.append(_row(gpu, "multi-adapter 16 adapters r 4/8/16/64",
                             f"fwd lora part {'packed' if packed else 'padded'}", "fwd",
                             Shape(4096, 4096, 4096, max(MULTI_RANKS)), ks))
    return rows


def _fb(fwd, bwd, s: Shape, gpu: str) -> float:
    """Eager forward+backward time at the stated efficiencies, µs."""
    return effective(fwd(s) + bwd(s), gpu)["model_time_us"]


def predictions(gpu: str) -> list[dict]:
    """What the model predicts for the GPU targets of the anchored plan on ``gpu`` (bf16, r 16): dicts with
    target, predicted value, bound, and whether the model says it is met."""
    out = []
    for d, bound in ((4096, 1.10), (8192, 1.05)):
        s = Shape(4096, d, d, 16)
        ratio = effective(anchored_fwd(s), gpu)["kernel_us"] / effective(base_gemm(s), gpu)["kernel_us"]
        out.append(dict(target=f"forward, kernels only (CUDA graphs) vs cuBLAS base GEMM, d {d}, 4096 tokens",
                        value=ratio, bound=bound, kind="<=", met=ratio <= bound))
    for p, bound in ((0.1, 1.5), (0.0, 1.3)):
        s = Shape(4096, 4096, 4096, 16, p)
        speed = _fb(peft_fwd, peft_bwd, s, gpu) / _fb(anchored_fwd, anchored_bwd, s, gpu)
        out.append(dict(target=f"forward+backward speed-up over PEFT, eager, d 4096, 4096 tokens, dropout {p}",
                        value=speed, bound=bound, kind=">=", met=speed >= bound))
    s = Shape(128, 1024, 1024, 16, 0.1)
    speed = _fb(peft_fwd, peft_bwd, s, gpu) / _fb(anchored_fwd, anchored_bwd, s, gpu)
    out.append(dict(target="forward+backward speed-up over PEFT, eager, d 1024, 128 tokens, dropout 0.1 "
                           "(never slower)", value=speed, bound=1.0, kind=">=", met=speed >= 1.0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n")[0])
    common.add_out_dir_option(ap)
    a = ap.parse_args(argv)
    rows = model_rows()
    print("MODEL (not a measurement): per-layer HBM bytes, FLOPs, launches; modelled time = Σ max(bytes/BW, "
          f"FLOPs/peak) (+ launches × {LAUNCH_US} µs assumed, eager). 'peak': the roofline; 'eff': cuBLAS GEMMs at "
          f"{GEMM_EFF} of peak FLOPs (measured on the H200), every kernel at {BW_EFF} of peak bandwidth (assumed)")
    for gpu in GPUS:
        print(f"\n[model] {gpu}: {GPUS[gpu]['source']}, {GPUS[gpu]['sms']} SMs")
        for case, _ in CASES:
            print(f"  {case}")
            for r in (r for r in rows if r["gpu"] == gpu and r["case"] == case):
                print(f"    {r['impl']:<26}{r['bytes'] / 2**20:>10.1f} MiB{float(r['gflops']):>10.2f} GFLOP"
                      f"{r['launches']:>4} launches{float(r['model_time_us']):>10.1f} µs peak+launch"
                      f"{float(r['kernel_us_eff']):>10.1f} µs eff kernels{float(r['eager_us_eff']):>10.1f} µs eff eager"
                      " (model)")
        print(f"  [model] predictions for the anchored plan's GPU targets on {gpu} (bf16, r 16):")
        for pr in predictions(gpu):
            print(f"    {pr['target']}: {pr['value']:.3f}x (target {pr['kind']} {pr['bound']}) -> "
                  f"{'met' if pr['met'] else 'NOT met'} (model)")
    print("\n[model] programs launched by the anchored plan's Triton kernels at 128 tokens, d 1024, r 16, vs SMs "
          f"(column tiles {PROLOGUE_COLS}; % = programs / SMs, below 100% leaves SMs idle — the time model above assumes "
          "full bandwidth, so its small-shape figures are optimistic for fastlora):")
    for bm in (64, 16):
        for gpu, g in GPUS.items():
            n = programs(128, 1024, 1024, 16, g["sms"], bm)
            print(f"    {bm:>3} rows/program, {gpu:<9} ({g['sms']} SMs): " + ", ".join(
                f"{k} {v} ({100 * v / g['sms']:.0f}%)" for k, v in n.items()))
    print("\n[model] multi-adapter LoRA part, M=4096, d=4096, ranks 4/8/16/64 (x4 adapters each), bf16:")
    for packed in (False, True):
        ks, wbytes = multi_adapter(4096, 4096, 4096, MULTI_RANKS, packed=packed)
        t = totals(ks, "H100 SXM")
        print(f"    {'packed' if packed else 'padded':<8} bank {wbytes / 2**20:7.1f} MiB, "
              f"{t['bytes'] / 2**20:7.1f} MiB moved, {t['flops'] / 1e9:7.2f} GFLOP, "
              f"{t['model_time_us']:7.1f} µs on H100 SXM (model)")
    print("\n[model] multi-adapter decode, 32 adapters r 16 x 1 token each, d 4096, bf16, H200 SXM: why the decode plan")
    print("        runs the same shrink/expand kernels (one token per 16-row tl.dot tile) instead of a BGMV kernel:")
    ks, _ = multi_adapter(32, 4096, 4096, [16] * 32)
    g = GPUS["H200 SXM"]
    for k in ks:
        mma = 16 * k.flops                 # the 16-row tile computes 16 rows for the 1 token it holds
        print(f"    {k.name:<28}{k.bytes / 2**20:7.2f} MiB -> {k.bytes / g['bw'] * 1e6:6.2f} µs at peak bandwidth; "
              f"tile MMAs incl. 15 idle rows {mma / g['flops'] * 1e6:6.3f} µs at peak BF16 (model)")
    print(f"    base GEMM 32 x 4096 x 4096: {2 * 4096 * 4096 / g['bw'] * 1e6:6.2f} µs at peak bandwidth (model); "
          f"launch overhead assumed {LAUNCH_US} µs each")
    path = common.write_csv(common.output_dir(a.out_dir) / "traffic_model.csv", CSV_COLUMNS, rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
