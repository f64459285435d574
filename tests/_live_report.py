"""pytest plugin: one line per finished test (and the failure's E-lines) appended to $FASTLORA_LIVE_REPORT
as it happens, so a run cut off by a time limit still tells what passed and why what failed failed.

    FASTLORA_LIVE_REPORT=out.txt python -m pytest -p tests._live_report ...     (benchmarks/run_gpu.sh does)
"""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTLORA_LIVE_REPORT")
    if os.environ.get("PYTEST_XDIST_WORKER"):      # under pytest-xdist the controller writes each report once
        return
    if not path or not (report.failed or report.when == "call"):
        return
    with open(path, "a") as f:
        if report.failed:
            lines = [ln for ln in str(report.longrepr).splitlines() if ln.startswith("E ")][-8:]
            f.write(f"FAIL {report.nodeid} [{report.when}] {report.duration:.1f}s\n")
            f.writelines(f"  {ln[:600]}\n" for ln in lines)
        else:
            f.write(f"{report.outcome} {report.nodeid} {report.duration:.1f}s\n")
