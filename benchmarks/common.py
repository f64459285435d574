"""Shared helpers for every benchmark: environment facts, timing, and one CSV writer.

Every CSV written by the benchmarks carries the same provenance columns
(``device``, ``dtype`` where relevant, ``versions``, ``timestamp``) so a result
file can be read without knowing how it was produced.
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

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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
