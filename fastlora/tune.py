"""python -m fastlora.tune — time every shipped tile config of the single-adapter LoRA kernels on this GPU and write
the fastest per shape to the tune cache that later runs read (fastlora.kernels.policy). Nothing is ever timed inside
a user's forward or backward: without a cache entry the kernels launch the policy's fixed rule.

Only the single-adapter kernels (shrink, expand, dsdb, dx: policy.TUNED) are tuned. The multi-adapter kernels ship
one config per tier (their tiles are the batch plan's) and the DoRA norm kernel follows the policy's fixed rule;
their configs live in the same policy tables and compile check.

    python -m fastlora.tune --tokens 4096 --dims 4096 8192 --ranks 16 --dtype bf16
    fastlora.tune(tokens=[4096], dims=[(4096, 4096)], ranks=[16], dtype=torch.bfloat16)

The cache: $FASTLORA_TUNE_CACHE, default ~/.cache/fastlora/tune.json, one section per device name; entries are
keyed by kernel, tile tier, token bucket (next power of two), width (N or K) and rank block.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Iterable

import torch

from .core.backend import interpreting
from .core.dropout import new_seed


def _candidates_timed(kernel, tier_, run, timer):
    from .kernels import policy
    best, best_ms = None, float("inf")
    for cfg in policy.candidates(kernel, tier_):
        with policy.forced(kernel, cfg):
            ms = timer(run)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def _wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def tune(tokens: Iterable[int], dims: Iterable[tuple[int, int]], ranks: Iterable[int] = (16,), *,
         dtype: torch.dtype = torch.bfloat16, adapter_dtype: torch.dtype | None = None, dropout_p: float = 0.1,
         device: str | torch.device = "cuda", path: str | None = None,
         timer: Callable[[Callable[[], object]], float] | None = None, out=None) -> dict:
    """Time each kernel's shipped configs for every (tokens, (K, N), rank) and write the winners to the cache.

    Returns {cache key: config}. ``timer(fn) -> ms`` defaults to triton.testing.do_bench (CUDA only); tests pass
    their own to run this on the interpreter.
    """
    from .kernels import linear_bwd, linear_fwd, policy
    out = out if out is not None else sys.stdout      # read at call time (a redirected stdout is honoured)
    device = torch.device(device)
    if timer is None:
        if device.type == "cuda":
            import triton.testing
            timer = triton.testing.do_bench
        elif device.type == "cpu" and interpreting():
            timer = _wall_ms          # a smoke run of the tuner itself (run_gpu.sh --dry-run): no timing claims
        else:
            raise RuntimeError(f"fastlora.tune times kernels on a CUDA device (or, as a smoke run, on the CPU "
                               f"with TRITON_INTERPRET=1); got device={device}")
    adt = adapter_dtype or dtype
    entries = {}
    for M in tokens:
        for K, N in dims:
            for r in ranks:
                x = torch.randn(M, K, device=device, dtype=dtype)
                w = torch.randn(N, K, device=device, dtype=dtype)
                A = torch.randn(r, K, device=device, dtype=adt)
                B = torch.randn(N, r, device=device, dtype=adt)
                bias = torch.randn(N, device=device, dtype=dtype)
                scale = torch.ones((), device=device, dtype=policy.acc_dtype(dtype))
                seed = new_seed(device)
                S = torch.empty(M, r, device=device, dtype=policy.acc_dtype(dtype))
                y = torch.empty(M, N, device=device, dtype=dtype)
                dy = torch.randn(M, N, device=device, dtype=dtype)
                prec, lprec = policy.fp32_precision(dtype), policy.lora_precision(dtype, adt)
                runs = {
                    "shrink": (K, lprec, lambda: linear_fwd.shrink(x, A, S, seed, dropout_p, lprec)),
                    "expand": (N, prec, lambda: linear_fwd.expand(S, B, bias, y, scale, prec)),
                    "dsdb": (N, lprec, lambda: linear_bwd.lora_bwd(dy, x, w, A, B, S, scale, dropout_p, seed, False,
                                                                   False, False, True, True, False)),
                    "dx": (K, lprec, lambda: linear_bwd.lora_bwd(dy, x, w, A, B, S, scale, dropout_p, seed, False,
                                                                 True, True, False, False, False)),
                }
                for kernel, (width, p_, run) in runs.items():
                    tier_ = policy.tier(kernel, dtype, p_)
                    cfg, ms = _candidates_timed(kernel, tier_, run, timer)
                    key = policy.cache_key(kernel, tier_, M, width, r)
                    entries[key] = cfg
                    print(f"{key:<40} {ms * 1e3:9.1f} us  {cfg}", file=out)
    name, _ = policy.device_info(device)
    policy.write_cache(path or policy.cache_path(), name, entries)
    print(f"wrote {len(entries)} entries for {name} to {path or policy.cache_path()}", file=out)
    return entries


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlora.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[4096], help="square layers d x d (K = N = d)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--fp32-adapters", action="store_true", help="adapters in fp32 on a half base (PEFT's default)")
    ap.add_argument("--cache", default=None, help="cache file (default: $FASTLORA_TUNE_CACHE or ~/.cache/fastlora)")
    ap.add_argument("--device", default="cuda", help="cuda[:i]; or cpu with TRITON_INTERPRET=1, a smoke run of the "
                                                     "tuner at toy sizes (what run_gpu.sh --dry-run does)")
    a = ap.parse_args(argv)
    for name in ("tokens", "dims", "ranks"):
        if any(v < 1 for v in getattr(a, name)):
            ap.error(f"--{name}: every value must be >= 1, got {getattr(a, name)}")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: tuning times kernels on the GPU that will run them")
    if device.type == "cpu" and not interpreting():
        ap.error("--device cpu needs TRITON_INTERPRET=1 (the kernels then run in Triton's interpreter)")
    dt = _DTYPES[a.dtype]
    tune(a.tokens, [(d, d) for d in a.dims], a.ranks, dtype=dt, adapter_dtype=torch.float32 if a.fp32_adapters else dt,
         device=device, path=a.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
