"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at the top of the first file pytest imports. With it, fastlora's dispatch sends CPU tensors to
the real Triton kernels, run by the interpreter (see fastlora/backend.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silence triton 3.9's default-change warning

import sys  # noqa: E402
from importlib.machinery import PathFinder  # noqa: E402
from pathlib import Path  # noqa: E402

# The repository root must not be on sys.path: there its kernels/ folder (installed as fastlora.kernels)
# would import as a top-level package `kernels`, shadowing Hugging Face's `kernels` package that
# transformers / bitsandbytes look for, and loading a second copy of our kernel modules. `python -m pytest`
# puts the current directory on sys.path, so it is taken out; `tests.*` and `benchmarks.*` (the only
# top-level names the tests import from the root) are found by name instead (tests/test_packaging.py).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


class _RootPackages:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return PathFinder.find_spec(name, [str(ROOT)]) if name in ("tests", "benchmarks") else None


sys.meta_path.insert(0, _RootPackages)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI (CI=true) replays a fixed set of hypothesis examples: a landing is never decided by a random draw.
# Locally the fuzzing stays random, so new examples keep being tried.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tests made of many tiny ops: one intra-op thread avoids OpenMP spin contention on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
