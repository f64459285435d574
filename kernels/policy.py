"""The launch policy of every kernel in kernels/: the tile config of each launch and the precision of each fp32
dot. Decided here, nowhere else, and never by timing inside a user's call.

Kernels (the keys of CANDIDATES):
  shrink, expand, dsdb, dx                   single adapter (linear_fwd.py, linear_bwd.py)
  multi_shrink, multi_expand, multi_grad     multi adapter (multi_lora.py): one config per tier, BLOCK_M = the
                                             batch plan's tile (fastlora/ops/multi_plan.py TILE_M)
  dora_norm                                  DoRA's row norms (dora_norm.py)

Tile configs come, in this order, from
  1. the interpreter's one small config per kernel (TRITON_INTERPRET=1: nothing to tune, the interpreter is slow;
     read from the environment, never written to it);
  2. for the single-adapter kernels (TUNED), the per-device tune cache written by ``python -m fastlora.tune`` (JSON;
     path: $FASTLORA_TUNE_CACHE, default ~/.cache/fastlora/tune.json), read once per process and again after each
     write; a missing entry, or an unreadable / stale file (a warning), falls back to
  3. a fixed rule: the first candidate of the kernel's list, with fewer rows per program when that leaves the
     GPU's SMs idle (programs are counted, not timed; the SM count comes from ``device_info``, the device hook).
Every candidate of every list is compiled for sm_80 and sm_90 with zero spills (python -m fastlora.inspect builds
its specs from these tables), so neither the rule nor the tuner can launch an unchecked config.

Tile lists are per tier (``tier``): "half" (16-bit data, tf32 dots), "x3" (16-bit data, tf32x3 dots, whose split
operands need fp32-sized registers; a kernel without an "x3" list uses its "fp32" one) and "fp32" (32/64-bit
data); "+drop" marks a kernel's separate list for launches with dropout (the Philox mask of the output tile).

Precision (``input_precision`` of tl.dot on fp32 operands):
  fp32 / fp64 base  torch's CUDA matmul setting: "tf32" when it allows tf32, else "ieee" (torch's default);
  half base         "tf32" for dots rounded to half at the end; "tf32x3" (≈ fp32, three tf32 products) for the
                    dots that produce or feed fp32 adapter gradients (S saved for dB, dS, dB, dA) — plain tf32
                    there leaves dA far less accurate than PEFT's fp32 matmuls (tests/kernels/test_gpu.py; the GPU
                    figures: docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
import triton

from ._env import interpreting
from ._layout import acc_dtype  # noqa: F401 - launchers read policy.acc_dtype
from ._torch_compat import cuda_matmul_allows_tf32

# ---------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------


def fp32_precision(x_dtype: torch.dtype) -> str:
    """input_precision for fp32 dots whose results are rounded to x's dtype (y, dx) or that run on an fp32 base."""
    if x_dtype == torch.float32:
        return "tf32" if cuda_matmul_allows_tf32() else "ieee"
    return "ieee" if x_dtype == torch.float64 else "tf32"


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """input_precision of the dots whose fp32 results are, or feed, adapter gradients (S saved for dB, dS, dB,
    dA): "tf32x3" for fp32 adapters on a half base (PEFT's default), else fp32_precision."""
    if x_dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32:
        return "tf32x3"
    return fp32_precision(x_dtype)


# Rank blocking: the skinny kernels (shrink, dS/dB) hold up to MAX_BLOCK_R ranks per program (32 with tf32x3
# dots, whose split operands need twice the registers); the expand and dx-prologue kernels walk the rank in
# chunks of CHUNK_R so their (BLOCK_M, BLOCK_N) tile never shares registers with a wide S.
MAX_BLOCK_R = 64
MAX_BLOCK_R_X3 = 32
CHUNK_R = 16


def block_r(r: int, precision: str = "tf32") -> int:
    """Rank block of the skinny kernels: a tl.dot-legal power of two ≥ 16, at most MAX_BLOCK_R (MAX_BLOCK_R_X3
    for tf32x3 dots)."""
    return max(16, min(triton.next_power_of_2(r), MAX_BLOCK_R_X3 if precision == "tf32x3" else MAX_BLOCK_R))


def tier(kernel: str, x_dtype: torch.dtype, precision: str, dropout: bool = False) -> str:
    """The key of ``kernel``'s tile list for a launch on ``x_dtype`` data with ``precision`` dots: "half", "x3" or
    "fp32" (module docstring), with "+drop" for a launch with dropout where the kernel lists those separately."""
    lists = CANDIDATES[kernel]
    half = x_dtype in (torch.float16, torch.bfloat16)
    key = ("x3" if precision == "tf32x3" else "half") if half else "fp32"
    if key not in lists:
        key = "fp32"
    return key + "+drop" if dropout and key + "+drop" in lists else key


# ---------------------------------------------------------------------------
# tile candidates, per kernel and tier (first = default); each a dict of meta-parameters + num_warps/num_stages
# ---------------------------------------------------------------------------

def _c(num_warps, num_stages, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def _multi(num_warps, num_stages, BLOCK_C, BLOCK_M=16):
    return [_c(num_warps, num_stages, BLOCK_M=BLOCK_M, BLOCK_R=16, BLOCK_C=BLOCK_C)]


INTERPRETER = {   # one small config per kernel: the interpreter is slow and has nothing to tune
    "shrink": _c(1, 1, BLOCK_M=16, BLOCK_K=16),
    "expand": _c(1, 1, BLOCK_M=16, BLOCK_N=16),
    "dsdb": _c(1, 1, BLOCK_M=16, BLOCK_N=16),
    "dx": _c(1, 1, BLOCK_M=16, BLOCK_K=16),
    "multi_shrink": _multi(1, 1, 32)[0],
    "multi_expand": _multi(1, 1, 32)[0],
    "multi_grad": _multi(1, 1, 32)[0],
    "dora_norm": _c(1, 1, BLOCK_N=16, BLOCK_K=16),
}

# shrink: S = drop(x)·Aᵀ, grid (M / BLOCK_M, R / BLOCK_R); streams x once (memory-bound), K-loop pipelined.
# expand: y0 = s·S·Bᵀ + bias, grid (M / BLOCK_M, N / BLOCK_N); writes y0 once (store-bound), no K-loop.
# dsdb:   dS, dB, dbias, grid (M / BLOCK_M, N splits, R / BLOCK_R); streams dY once.
# dx:     dx0 = (dS·A)⊙keep/(1−p) and dA, grid (M / BLOCK_M, K / BLOCK_K); reads x and writes dx0 once.
# multi_*: the gather kernels, grid over the batch plan's tiles. BLOCK_M = 16 is the smallest tl.dot tile (decode
#   tiles hold one token) and the plan's tile (shrink and expand share the plan; both regimes share one config,
#   so the shipped set stays small). The gathered rows make every x / out address a 64-bit register, so tiles stay
#   modest. multi_shrink's tf32x3 dots take half the BLOCK_C; multi_expand with dropout (dx) keeps 1 stage (2
#   spilled 16 B on sm_80 for fp16).
# dora_norm: grid (N / BLOCK_N,); few rows per program (at d 4096 a 32-row block is 128 programs, about one per
#   SM on an H100/H200), each streaming its rows of W0 through a pipelined K-loop; small K tiles (memory-bound,
#   the A tile is re-read from L2 by every program). Its only fp32 tile found spill-free for ieee dots on sm_80 and
#   sm_90 at every rank block is 16x32 (32x32 with 4 or 8 warps, 16x32 with 4 stages and 64x32 each spilled 8-16
#   bytes somewhere).
CANDIDATES = {
    # (16x64 spilled 8 B on sm_80 for fp32 adapters at 64 ranks with dropout)
    "shrink": {"half": [_c(4, 3, BLOCK_M=64, BLOCK_K=64), _c(4, 4, BLOCK_M=64, BLOCK_K=64),
                        _c(4, 3, BLOCK_M=32, BLOCK_K=64)],
               "fp32": [_c(4, 3, BLOCK_M=64, BLOCK_K=32), _c(4, 4, BLOCK_M=64, BLOCK_K=32),
                        _c(4, 3, BLOCK_M=32, BLOCK_K=32), _c(4, 3, BLOCK_M=16, BLOCK_K=32)]},
    "expand": {"half": [_c(4, 2, BLOCK_M=64, BLOCK_N=128), _c(8, 2, BLOCK_M=128, BLOCK_N=128),
                        _c(4, 2, BLOCK_M=64, BLOCK_N=64), _c(4, 2, BLOCK_M=32, BLOCK_N=64)],
               "fp32": [_c(4, 2, BLOCK_M=64, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=128),
                        _c(4, 2, BLOCK_M=32, BLOCK_N=64)]},
    "dsdb": {"half": [_c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(4, 4, BLOCK_M=64, BLOCK_N=64),
                      _c(4, 3, BLOCK_M=32, BLOCK_N=64)],
             "fp32": [_c(4, 3, BLOCK_M=64, BLOCK_N=16), _c(4, 3, BLOCK_M=32, BLOCK_N=16)]},
    # 64x128 / 128x128 dx tiles spill on sm_80 with dropout (the Philox mask of the tile), and under triton 3.8 the
    # fp32-tier 64x64 dx tile and the 2-stage fp32 dS/dB tiles spill a few bytes (3.9 too): python -m fastlora.inspect
    "dx": {"half": [_c(4, 2, BLOCK_M=64, BLOCK_K=64), _c(8, 2, BLOCK_M=128, BLOCK_K=64),
                    _c(4, 2, BLOCK_M=32, BLOCK_K=128), _c(4, 2, BLOCK_M=32, BLOCK_K=64)],
           "fp32": [_c(4, 2, BLOCK_M=32, BLOCK_K=64), _c(4, 2, BLOCK_M=64, BLOCK_K=32),
                    _c(4, 2, BLOCK_M=32, BLOCK_K=32)]},
    "multi_shrink": {"half": _multi(4, 3, 128), "x3": _multi(4, 3, 64), "fp32": _multi(4, 3, 128)},
    "multi_expand": {"half": _multi(4, 2, 128), "half+drop": _multi(4, 1, 128),
                     "fp32": _multi(4, 2, 128), "fp32+drop": _multi(4, 1, 128)},
    "multi_grad": {"half": _multi(4, 2, 64, BLOCK_M=32), "fp32": _multi(4, 2, 64, BLOCK_M=32)},
    "dora_norm": {"half": [_c(4, 3, BLOCK_N=32, BLOCK_K=64), _c(4, 4, BLOCK_N=16, BLOCK_K=64)],
                  "fp32": [_c(4, 3, BLOCK_N=16, BLOCK_K=32)]},
}
KERNELS = tuple(CANDIDATES)
TUNED = ("shrink", "expand", "dsdb", "dx")     # what python -m fastlora.tune times and the tune cache holds


def candidates(kernel: str, tier_: str) -> list[dict]:
    """The configs ``kernel`` may launch with for a tier: the shipped list, or the interpreter's one config."""
    if interpreting():
        return [INTERPRETER[kernel]]
    return CANDIDATES[kernel][tier_]


def _programs(kernel: str, cfg: dict, M: int, width: int, R: int) -> int:
    """Programs of a launch (its grid's size); M counts the rows of x, dY, or W0 (dora_norm)."""
    if kernel == "dora_norm":
        return triton.cdiv(M, cfg["BLOCK_N"])
    rows = triton.cdiv(M, cfg["BLOCK_M"])
    if kernel in ("shrink", "dsdb"):
        return rows * triton.cdiv(R, 16)
    return rows * triton.cdiv(width, cfg["BLOCK_N" if kernel == "expand" else "BLOCK_K"])


def default_config(kernel: str, tier_: str, M: int, width: int, R: int, sms: int | None) -> dict:
    """The fixed rule: the kernel's first candidate; where that launches fewer programs than the device has
    SMs, the candidate with the most programs, counted up to the SM count (ties: the earlier candidate)."""
    cands = candidates(kernel, tier_)
    first = cands[0]
    if sms is None or len(cands) == 1 or _programs(kernel, first, M, width, R) >= sms:
        return first
    return max(cands, key=lambda c: (min(_programs(kernel, c, M, width, R), sms), -cands.index(c)))


# ---------------------------------------------------------------------------
# the tune cache (python -m fastlora.tune writes it for the TUNED kernels; read once per process and after each
# write, never timed here)
# ---------------------------------------------------------------------------

CACHE_ENV = "FASTLORA_TUNE_CACHE"
CACHE_VERSION = 1


def cache_path() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastlora", "tune.json")


def m_bucket(M: int) -> int:
    """Token count bucket of a tuned entry: the next power of two."""
    return triton.next_power_of_2(max(M, 1))


def cache_key(kernel: str, tier_: str, M: int, width: int, R: int) -> str:
    """'kernel/tier/M-bucket/width/rank-block': width is N (expand, dsdb) or K (shrink, dx)."""
    return f"{kernel}/{tier_}/{m_bucket(M)}/{width}/{block_r(R)}"


_tuned: dict[str, dict] | None = None      # device name -> {cache_key: config}
_device_info: dict = {}                    # device index -> (name, SM count)
_forced: dict[str, dict] = {}              # kernel -> config, while fastlora.tune times that config


def _load() -> dict:
    global _tuned
    if _tuned is None:
        _tuned = read_cache(cache_path())
    return _tuned


def read_cache(path: str) -> dict:
    """{device name: {key: config}} from a tune cache; {} (with a warning) for a corrupt or stale file. Entries
    that are not shipped candidates are dropped with a warning (an old file must not launch an unchecked config)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        out = {}
        for dev, entries in data["devices"].items():
            for key, cfg in entries.items():
                kernel, tier_ = key.split("/")[:2]
                if kernel not in TUNED:
                    raise ValueError(f"{key}: {kernel} is not a tuned kernel")
                if cfg not in candidates(kernel, tier_):
                    raise ValueError(f"{key}: {cfg} is not a shipped config")
                out.setdefault(dev, {})[key] = cfg
        return out
    except Exception as e:  # noqa: BLE001 — any unreadable cache means: defaults, and say so
        warnings.warn(f"fastlora: ignoring the tune cache {path} ({type(e).__name__}: {e}); using the default "
                      f"launch configs. Re-run `python -m fastlora.tune` to rebuild it.", stacklevel=3)
        return {}


def write_cache(path: str, device_name: str, entries: dict) -> None:
    """Merge ``entries`` ({key: config}) for one device into the cache file (atomically replaced)."""
    data = {"version": CACHE_VERSION, "devices": {}}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            if old.get("version") == CACHE_VERSION:
                data = old
        except Exception:  # noqa: BLE001 — a corrupt file is overwritten
            pass
    data["devices"].setdefault(device_name, {}).update(entries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    reset()


def reset() -> None:
    """Forget the cache read so far (the next launch re-reads it): after tuning, and in tests."""
    global _tuned
    _tuned = None


def device_info(device: torch.device) -> tuple[str, int | None]:
    """(name, SM count) of a CUDA device, read once; ("interpreter", None) off the GPU. The policy's one view of
    the device: tests fake a GPU (its name and SM count) by replacing this function."""
    if device.type != "cuda":
        return "interpreter", None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _device_info:
        props = torch.cuda.get_device_properties(idx)
        _device_info[idx] = (props.name, props.multi_processor_count)
    return _device_info[idx]


def config(kernel: str, x_dtype: torch.dtype, precision: str, M: int, width: int, R: int,
           device: torch.device, dropout: bool = False) -> dict:
    """The launch config of ``kernel`` for this call: interpreter config, tuned entry, or the fixed rule.
    ``width``: N (expand, dsdb) or K (shrink, dx, dora_norm); ``dropout``: the launch draws a keep-mask."""
    if kernel in _forced:
        return _forced[kernel]
    if interpreting():
        return INTERPRETER[kernel]
    tier_ = tier(kernel, x_dtype, precision, dropout)
    name, sms = device_info(device)
    if kernel in TUNED:
        cfg = _load().get(name, {}).get(cache_key(kernel, tier_, M, width, R))
        if cfg is not None:
            return cfg
    return default_config(kernel, tier_, M, width, R, sms)


@contextlib.contextmanager
def forced(kernel: str, cfg: dict):
    """Launch ``kernel`` with ``cfg`` inside the block (fastlora.tune's timing loop; never used in a user's call)."""
    _forced[kernel] = cfg
    try:
        yield
    finally:
        del _forced[kernel]


def launch_options(cfg: dict) -> tuple[dict, dict]:
    """(meta-parameters, {num_warps, num_stages}) of a config."""
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    return meta, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
