"""tools/mutation_smoke.py, the cheap parts: the mutant list is well-formed and matches the code (every old
text present exactly once, so a rewrite that moves the code fails here until the list is updated), and the
temporary copy it tests really imports fastlora *and* fastlora.kernels from the copy. The full smoke run
(a few minutes) is documented in docs/ARCHITECTURE.md."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("mutation_smoke", ROOT / "tools" / "mutation_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod              # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_every_mutant_is_well_formed_and_matches_the_code(smoke):
    assert smoke.problems(ROOT) == []


def test_the_audited_bugs_are_all_listed(smoke):
    """Issue 14's ten: five the suite missed, five it caught."""
    ids = {m.id for m in smoke.MUTANTS}
    assert {"det-atomic", "multi-bwd-fifo", "dW-single", "rslora-load", "split-n-ds-sum",
            "dA-dropout-scale", "dB-scale", "bwd-fifo", "multi-offsets", "merge-precision"} <= ids


def test_problems_reports_stale_and_malformed_mutants(smoke, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    (tmp_path / "t.py").write_text("")
    M = smoke.Mutant
    bad = smoke.problems(tmp_path, (
        M("gone", "a.py", "y = 2\n", "y = 3\n", ("t.py", "-k", "t"), "old text no longer there"),
        M("twice", "a.py", "x = 1\n", "x = 2\n", ("t.py", "-k", "t"), "old text ambiguous"),
        M("no-k", "a.py", "x = 1\nx", "x = 2\nx", ("t.py",), "no selection"),
        M("no-file", "b.py", "x", "y", ("t.py", "-k", "t"), "file moved"),
        M("no-file", "a.py", "x = 1\nx", "x = 1\nx", ("u.py", "-k", "t"), "duplicate id, no-op, missing test"),
    ))
    text = "\n".join(bad)
    assert "gone: old text found 0 times" in text and "stale mutant" in text
    assert "twice: old text found 2 times" in text
    assert "no-k: tests must be" in text
    assert "no-file: b.py does not exist" in text
    assert "duplicate mutant id 'no-file'" in text and "must differ" in text and "u.py does not exist" in text


def test_package_path_follows_setuptools_package_dir(smoke):
    assert smoke.package_path("fastlora.kernels", {"": "src"}) == Path("src/fastlora/kernels")
    assert smoke.package_path("fastlora.kernels", {"fastlora": "fastlora", "fastlora.kernels": "kernels"}) \
        == Path("kernels")
    assert smoke.package_path("fastlora", {}) == Path("fastlora")


def test_the_copy_imports_fastlora_and_its_kernels_from_itself(smoke, tmp_path):
    """The copy under test, never the installed working tree (nor a mix of both: an editable install can map
    fastlora.kernels elsewhere), must be what `import fastlora` / `fastlora.kernels` load in the smoke."""
    copy, boot = tmp_path / "repo", tmp_path / "boot"
    copy.mkdir()
    for name in ("fastlora", "kernels", "src"):   # what the import needs (copy_tree itself needs a git checkout)
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, copy / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(ROOT / "pyproject.toml", copy / "pyproject.toml")
    mapping = smoke.write_boot(copy, boot)
    assert {"fastlora", "fastlora.kernels"} <= set(mapping)
    assert all(Path(d).is_relative_to(copy) and Path(d).is_dir() for d in mapping.values())
    assert smoke.check_resolution(copy, smoke.child_env(boot), mapping) is None
    # and the check can fail: a finder mapping the packages to the working tree is caught
    elsewhere = smoke.write_boot(ROOT, tmp_path / "boot_elsewhere")
    assert "resolve outside the copy" in smoke.check_resolution(copy, smoke.child_env(tmp_path / "boot_elsewhere"),
                                                                elsewhere)
