"""pytest glue for the microbenchmarks (benchmarks/bench_*.py, pytest-benchmark).

    python -m pytest benchmarks/bench_linear.py --benchmark-only

Each benchmark test calls ``record(benchmark, kernel=…, provider=…, mode=…, shape=…, dtype=…)``
after timing; at the end of the session the rows go to
<output folder>/<kernel>_<device tag>.csv (columns: common.MICRO_COLUMNS) and a PNG beside it; the
output folder is $FASTLORA_BENCH_OUT if set, else benchmarks/out/ (git-ignored; common.output_dir).
These files are not part of the test suite
(pyproject's testpaths = tests); TRITON_INTERPRET is not set here, so on CPU fastlora runs its
pure-torch path — what a CPU user gets.
"""
from __future__ import annotations

from collections import defaultdict

import pytest

from benchmarks import common


@pytest.fixture(scope="session")
def _micro_rows():
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    yield rows
    out = common.output_dir()
    from benchmarks import plot
    for (kernel, tag), rs in rows.items():
        path = common.write_csv(out / f"{kernel}_{tag}.csv", common.MICRO_COLUMNS, rs)
        plot.plot_micro(path, path.with_suffix(".png"))
        print(f"\nwrote {path} and {path.with_suffix('.png')}")


@pytest.fixture
def record(_micro_rows):
    """record(benchmark, kernel, provider, mode, shape, dtype, device): one CSV row from pytest-benchmark's stats."""
    vers, stamp = common.versions(), common.timestamp()

    def _record(benchmark, *, kernel, provider, mode, shape, dtype, device):
        stats = getattr(benchmark, "stats", None)
        if stats is None:                     # --benchmark-disable: nothing was timed
            return
        data = [t * 1e3 for t in stats.stats.data]
        _micro_rows[(kernel, common.device_tag(device))].append(dict(
            kernel=kernel, provider=provider, mode=mode, shape=shape,
            median_ms=f"{common.quantile(data, 0.5):.4f}", p20_ms=f"{common.quantile(data, 0.2):.4f}",
            p80_ms=f"{common.quantile(data, 0.8):.4f}", rounds=len(data), device=common.device_name(device),
            dtype=str(dtype).replace("torch.", ""), versions=vers, timestamp=stamp))

    return _record
