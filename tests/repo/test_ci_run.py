"""CI and the README agree: .ci/run runs README's test command in both environments it sets up, is valid
bash, and the README's supported-versions table states the lower bounds pyproject declares."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
TEST_COMMAND = 'pip install -e ".[test,bench]" && python -m pytest -q'


def test_readme_states_the_test_command():
    assert f"    {TEST_COMMAND}\n" in README


def test_ci_runs_the_readme_command_in_both_environments():
    system = 'python3 -m pip install -q -e ".[test,bench]" && python3 -m pytest -q'
    venv = 'pip install -q -e ".[test,bench]" && python -m pytest -q'
    lines = [ln.strip() for ln in CI.splitlines() if not ln.lstrip().startswith("#")]
    assert any(ln.startswith(system) for ln in lines), ".ci/run no longer runs README's command (torch 2.13 env)"
    assert venv in lines, ".ci/run no longer runs README's command in the fresh venv"
    assert "python3 -m venv" in CI and "docs/build_api.py" in CI


def test_ci_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_version_table_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"(\w+)>=([\d.]+)", d).groups() for d in deps if ">=" in d)
    for name in ("torch", "triton"):
        row = next(ln for ln in README.splitlines() if ln.startswith(f"| {name} |"))
        assert row.rstrip().endswith(f"≥ {floors[name]} |"), f"README says {row!r}, pyproject {name}>={floors[name]}"


def test_ci_runs_the_documented_commands_from_the_root_after_the_tests():
    """Issue 18: the main job, train_step --quick and the GPU day's dry run, in the fresh venv, after its tests."""
    venv_part = CI.split("python3 -m venv", 1)[1]
    order = [venv_part.index(c) for c in ('python -m pytest -q', "python -m benchmarks.paper_table --quick",
                                          "python -m benchmarks.train_step --quick",
                                          "bash benchmarks/run_gpu.sh --dry-run", "git status --porcelain")]
    assert order == sorted(order), order


def test_gpu_script_runs_its_steps_in_the_planned_order():
    """One call on a lent GPU: what we most need first (issue 18): the probe, the GPU parity tests, the training
    steps (16-bit, 4-bit), multi-adapter, the paper table, then tuning and a re-probe if time remains."""
    script = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
    steps = re.findall(r"^step (\w+) ", script, re.MULTILINE)
    assert steps == ["probe", "tests", "train", "train4bit", "multi", "moe", "paper", "tune",
                     "reprobe"], steps
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_gpu.sh")]).returncode == 0
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
