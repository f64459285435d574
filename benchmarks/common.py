"""Shared helpers for every benchmark: environment facts, timing, and one CSV writer.

Every CSV written by the benchmarks carries the same provenance columns
(``device``, ``dtype`` where relevant, ``versions``, ``timestamp``) so a result
file can be read without knowing how it was produced.

Output folder (one rule for every benchmark, ``output_dir``): ``--out-dir`` if given, else the
environment variable FASTLORA_BENCH_OUT, else ``benchmarks/out/`` (git-ignored). The committed
reference results under ``benchmarks/results/`` are written only when named explicitly
(``--out-dir benchmarks/results``): a user's run never overwrites them.

Ratios between two timed things come from interleaved trials, one ratio per trial (``ratio_interval``):
the geometric mean of the paired ratios with a 95% Student-t interval on their logarithms.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"      # committed reference results
OUT_DIR = Path(__file__).resolve().parent / "out"              # default output folder, git-ignored
OUT_ENV = "FASTLORA_BENCH_OUT"

# FASTLORA_BENCH_TINY=1: toy sizes on the CPU, for `bash benchmarks/run_gpu.sh --dry-run` (the same code paths as
# the GPU run, in seconds; no timing claims). Read by the pytest-benchmark files, whose sizes are module constants.
TINY = os.environ.get("FASTLORA_BENCH_TINY", "") not in ("", "0")

# Columns of the microbenchmark CSVs (Liger-Kernel's layout, plus provenance).
MICRO_COLUMNS = ("kernel", "provider", "mode", "shape", "median_ms", "p20_ms", "p80_ms",
                 "rounds", "device", "dtype", "versions", "timestamp")


def cpu_name() -> str:
    """The CPU model as the OS reports it (``lscpu``'s "Model name"), or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device that ran a benchmark, with the CPU thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def versions() -> str:
    """'torch=… triton=… fastlora=… peft=… transformers=…' (missing packages say 'absent')."""
    from importlib import metadata
    out = []
    for mod in ("torch", "triton", "fastlora", "peft", "transformers", "loralib"):
        try:
            v = getattr(__import__(mod), "__version__", None) or metadata.version(mod)
        except Exception:                      # noqa: BLE001 - an absent optional package is a fact, not an error
            v = "absent"
        out.append(f"{mod}={v}")
    return " ".join(out)


def timestamp() -> str:
    """UTC timestamp, ISO 8601, seconds resolution."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, trials: int, warmup: int,
            progress: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` per trial, after ``warmup`` untimed calls.

    On CUDA each trial is bracketed by synchronisations, so a trial is the whole
    forward pass including its kernels, as in the LoRA paper's latency table.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(trials):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if progress is not None:
            progress()
    return times


def cuda_graph(call: Callable[[], object], grad: bool = False) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``call`` (warmed up on a side stream first, as torch.cuda.graphs requires); ``grad``:
    capture with autograd on (a forward+backward), else under no_grad."""
    with torch.set_grad_enabled(grad):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
    return g


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without needing numpy."""
    v = sorted(values)
    if not v:
        raise ValueError("quantile of an empty sequence")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write ``rows`` (dicts keyed by ``columns``) to ``path``; creates the folder. Returns the path.

    A row with a key not in ``columns`` or missing one is an error (no silently dropped data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    for row in rows:
        if set(row) != set(columns):
            raise ValueError(f"CSV row keys {sorted(row)} differ from columns {sorted(columns)}")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def device_tag(device: torch.device | str) -> str:
    """Short tag for file names: 'cpu' or 'cuda-<name without spaces>'."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device))
    return "cpu"


def quiet_transformers() -> None:
    """Silence transformers' info logging and deprecation chatter (FutureWarning) in a benchmark's output."""
    import warnings

    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------- output folder

def output_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder a benchmark writes to: ``explicit`` (the --out-dir option) if given, else $FASTLORA_BENCH_OUT,
    else OUT_DIR (benchmarks/out/, git-ignored). Never benchmarks/results/ unless one of the first two names it."""
    chosen = explicit if explicit not in (None, "") else (os.environ.get(OUT_ENV) or OUT_DIR)
    return Path(chosen)


def add_out_dir_option(parser) -> None:
    """``--out-dir`` (alias ``--out``) on an argparse parser, resolved later with ``output_dir(args.out_dir)``."""
    parser.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                        help=f"folder for the CSV and PNG (default: ${OUT_ENV} if set, else benchmarks/out/, "
                             "git-ignored; the committed reference results are benchmarks/results/)")


# ---------------------------------------------------------------------------- paired ratios

# Student t quantiles t_{0.975, df} for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean, 95% low, 95% high) of paired per-trial ratios.

    Each ratio is one trial's time of A over the same trial's time of B (interleaved, so a slow spell
    hits both). The interval is Student's t on log(ratio) (ratios are multiplicative: 2x and 0.5x are
    symmetric), exponentiated back. One ratio gives no interval: (r, nan, nan).
    """
    import math
    rs = [float(r) for r in ratios]
    if not rs:
        raise ValueError("ratio_interval of an empty sequence")
    if any(not (r > 0) or math.isinf(r) for r in rs):
        raise ValueError(f"ratios must be positive and finite, got {rs}")
    logs = [math.log(r) for r in rs]
    n, mean = len(logs), sum(logs) / len(logs)
    if n == 1:
        return math.exp(mean), float("nan"), float("nan")
    sd = (sum((v - mean) ** 2 for v in logs) / (n - 1)) ** 0.5
    half = t975(n - 1) * sd / n ** 0.5
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def indistinguishable(lo: float, hi: float, at: float = 1.0) -> bool:
    """True when the interval [lo, hi] contains ``at`` (or there is no interval): the data cannot tell
    the ratio from ``at`` (1.0: the two timed things are equally fast) at 95%."""
    import math
    return math.isnan(lo) or math.isnan(hi) or lo <= at <= hi
