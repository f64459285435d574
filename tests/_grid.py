"""The op grid's axes (tests/ops/test_grid.py) and its table at the end of the session.

    OPS × ENTRIES × BACKENDS          one cell each: the output and every gradient vs the float64 oracle
    NOT_SERVED[(op, entry)]           why a cell is not served (the cell skips with that reason)
    NO_BACKWARD_KERNEL[op]            why the op's triton backward launches no Triton kernel (by design)

The two hooks below are imported by tests/conftest.py: after a run that reached the grid, pytest's summary
prints one line per op and one column per (entry, backend), each ``pass``, ``skip``, ``FAIL`` or ``-`` (not
run), so a missing cell shows without reading the skip list.
"""
from __future__ import annotations

from itertools import product

OPS = ("lora", "multi", "dora", "qlora", "moe")
ENTRIES = ("eager-inference", "eager-training", "compile")
BACKENDS = ("triton", "torch")
# (op, entry) -> why that cell is not served (every backend); empty when the whole grid runs
NOT_SERVED: dict[tuple[str, str], str] = {}
# op -> why its triton backward runs no Triton kernel (every other op's triton backward must launch one)
NO_BACKWARD_KERNEL = {
    "dora": "DoRA's GEMMs are torch matmuls; Triton runs only the forward's norm pass, whose result is detached "
            "(fastlora/ops/dora.py)",
}

_CELL_TEST = "tests/ops/test_grid.py::test_cell["
_IDS = {f"{op}-{entry}-{backend}": (op, entry, backend) for op, entry, backend in product(OPS, ENTRIES, BACKENDS)}
_outcomes: dict[tuple[str, str, str], str] = {}


def grid_table(outcomes: dict[tuple[str, str, str], str]) -> str:
    """The grid as text: one row per op, one column per (entry, backend); a cell absent from ``outcomes`` is
    ``-`` (not run)."""
    cols = list(product(ENTRIES, BACKENDS))
    width = max(len(e) for e in ENTRIES) // 2 + 1
    head = ["op".ljust(6) + "".join(e.ljust(2 * width) for e in ENTRIES),
            " " * 6 + "".join(b.ljust(width) for _, b in cols)]
    rows = [op.ljust(6) + "".join(outcomes.get((op, e, b), "-").ljust(width) for e, b in cols) for op in OPS]
    return "\n".join(line.rstrip() for line in head + rows)


def pytest_runtest_logreport(report):
    if not report.nodeid.startswith(_CELL_TEST):
        return
    cell = _IDS.get(report.nodeid[len(_CELL_TEST):-1])
    if cell is None:
        return
    if report.failed:
        _outcomes[cell] = "FAIL"
    elif report.skipped and _outcomes.get(cell) != "FAIL":
        _outcomes[cell] = "skip"
    elif report.when == "call" and report.passed:
        _outcomes[cell] = "pass"


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    terminalreporter.section("op grid: output and every gradient vs float64 (tests/ops/test_grid.py)")
    terminalreporter.write_line(grid_table(_outcomes))
    for (op, entry), why in NOT_SERVED.items():
        terminalreporter.write_line(f"not served: {op} × {entry}: {why}")
    for op, why in NO_BACKWARD_KERNEL.items():
        if any(cell[0] == op and cell[2] == "triton" for cell in _outcomes):
            terminalreporter.write_line(f"{op} × triton: no Triton kernel in the backward: {why}")
