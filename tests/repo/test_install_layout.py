"""`import fastlora` gives the installed package whatever the current folder is called: run from the folder
that holds a clone named `fastlora`, Python must not import that clone folder as an empty namespace package
(it did with setuptools' import-hook editable install; pyproject's package-dir makes it a path entry)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_from_the_parent_of_a_clone_named_fastlora(tmp_path):
    clone = tmp_path / "fastlora"                   # what `git clone ... fastlora` leaves: no __init__.py here
    for name in ("fastlora", "kernels", "src"):
        shutil.copytree(ROOT / name, clone / name, symlinks=True)
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    code = ("import pathlib, fastlora\n"
            "f = fastlora.__file__\n"
            "print(pathlib.Path(f).resolve() if f else f'namespace package {list(fastlora.__path__)}')\n"
            "print(callable(getattr(fastlora, 'patch', None)), callable(getattr(fastlora, 'lora_linear', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, api = out.stdout.strip().splitlines()[-2:]
    assert not where.startswith("namespace") and not Path(where).is_relative_to(tmp_path), \
        f"`import fastlora` run from {tmp_path} imported the clone folder: {where}"
    assert api == "True True", f"fastlora imported from {where} lacks its API"


def test_symlinked_layout_is_intact():
    """pyproject reads the package through src/fastlora -> fastlora and fastlora/kernels -> kernels."""
    assert (ROOT / "src" / "fastlora").resolve() == ROOT / "fastlora"
    assert (ROOT / "fastlora" / "kernels").resolve() == ROOT / "kernels"
    assert (ROOT / "src" / "fastlora" / "kernels" / "linear_fwd.py").is_file()
