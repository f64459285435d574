"""Our kernels/ folder is importable only as fastlora.kernels (pyproject's package-dir), never as a
top-level package named ``kernels``: that name belongs to Hugging Face's kernels package, which
transformers and bitsandbytes try to import; finding ours there would load a second copy of our
kernel modules under another name (issue 14)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import fastlora.kernels

ROOT = Path(__file__).resolve().parents[1]
OURS = Path(fastlora.kernels.__file__).resolve().parent


def test_top_level_kernels_is_not_our_folder():
    assert OURS == ROOT / "kernels"
    spec = importlib.util.find_spec("kernels")       # None, or Hugging Face's package when installed
    found = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    assert OURS not in found, f"`import kernels` would load {OURS} (sys.path: {sys.path})"
    assert not any((Path(p or ".").resolve() / "kernels").resolve() == OURS for p in sys.path), sys.path
    loaded = sys.modules.get("kernels")
    assert loaded is None or OURS not in [Path(p).resolve() for p in getattr(loaded, "__path__", [])]


def test_pytest_settings_do_not_put_the_root_on_sys_path():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^\s*pythonpath\s*=", section, re.MULTILINE), \
        "pytest's pythonpath would make kernels/ importable as `kernels`"


def test_no_test_or_benchmark_imports_top_level_kernels():
    bad = re.compile(r"^\s*(from\s+kernels(\.|\s)|import\s+kernels\b)", re.MULTILINE)
    offenders = [str(f.relative_to(ROOT)) for d in ("tests", "benchmarks", "tools", "fastlora")
                 for f in sorted((ROOT / d).rglob("*.py")) if bad.search(f.read_text())]
    assert offenders == [], f"import fastlora.kernels..., not kernels...: {offenders}"
