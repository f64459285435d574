"""Our kernels/ folder is importable only as fastlora.kernels, never as a top-level package named ``kernels``:
that name belongs to Hugging Face's kernels package, which transformers (5.x depends on it) and bitsandbytes
import. kernels/ has no ``__init__.py``: from the repository root (where Python puts the current folder first on
sys.path) it is at most a namespace-package portion, and any installed regular package named ``kernels`` wins
over it, wherever it sits on sys.path (issue 18). The tests run with the root on sys.path, as users do."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_in_root(code: str, env_path: str | None = None) -> str:
    env = None
    if env_path is not None:
        import os
        env = {**os.environ, "PYTHONPATH": env_path}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py would make the folder shadow Hugging Face's `kernels` from the repo root"


def test_stand_in_kernels_package_wins_from_the_repo_root(tmp_path):
    """A regular package named `kernels` anywhere on sys.path (here: PYTHONPATH, after the root) is what
    `import kernels` gives in a process started in the repository root; fastlora still imports its own."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    out = _run_in_root("import sys, kernels, fastlora, fastlora.kernels.linear_fwd as f\n"
                       "print(sys.path[0] == '', getattr(kernels, 'STAND_IN', False), kernels.__file__)\n"
                       "print(f.__name__, callable(fastlora.lora_linear))", env_path=str(tmp_path))
    first, second = out.strip().splitlines()[-2:]
    assert first.startswith("True True "), out
    assert second == "fastlora.kernels.linear_fwd True", out


def test_transformers_and_installed_kernels_from_the_repo_root():
    """What the README's main job does first: transformers' models, fastlora and PEFT, from the root."""
    pytest.importorskip("transformers")
    code = ("from transformers import GPT2LMHeadModel, LlamaForCausalLM\nimport fastlora, peft, kernels\n"
            "print(getattr(kernels, '__file__', None) or list(kernels.__path__))")
    where = _run_in_root(code).strip().splitlines()[-1]
    assert not where.startswith(str(ROOT / "kernels")) and str(ROOT / "kernels") not in where, where


def test_pytest_settings_do_not_put_the_root_on_sys_path_twice():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^\s*pythonpath\s*=", section, re.MULTILINE), \
        "`python -m pytest` already puts the root first; pythonpath would add it again"


def test_no_test_or_benchmark_imports_top_level_kernels():
    bad = re.compile(r"^\s*(from\s+kernels(\.|\s)|import\s+kernels\b)", re.MULTILINE)
    offenders = [str(f.relative_to(ROOT)) for d in ("tests", "benchmarks", "tools", "fastlora")
                 for f in sorted((ROOT / d).rglob("*.py")) if bad.search(f.read_text())]
    assert offenders == [], f"import fastlora.kernels..., not kernels...: {offenders}"
