"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at the top of the first file pytest imports. With it, fastlora's dispatch sends CPU tensors to
the real Triton kernels, run by the interpreter (see fastlora/core/backend.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silence triton 3.9's default-change warning

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests._grid import pytest_runtest_logreport, pytest_terminal_summary  # noqa: E402, F401  (the op grid's table)

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
