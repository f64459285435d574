"""kernels/_torch_compat: torch's CUDA fp32 matmul precision, read and set through the API torch has."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastlora.kernels._torch_compat import cuda_matmul_allows_tf32, cuda_matmul_tf32


def test_set_and_restore_through_one_helper():
    before = cuda_matmul_allows_tf32()
    with cuda_matmul_tf32(True):
        assert cuda_matmul_allows_tf32() is True
        with cuda_matmul_tf32(False):
            assert cuda_matmul_allows_tf32() is False
        assert cuda_matmul_allows_tf32() is True
    assert cuda_matmul_allows_tf32() is before


def test_restored_after_an_error():
    before = cuda_matmul_allows_tf32()
    with pytest.raises(KeyError), cuda_matmul_tf32(not before):
        raise KeyError("boom")
    assert cuda_matmul_allows_tf32() is before


def test_rejects_non_bool():
    with pytest.raises(TypeError, match="allow must be a bool"):
        with cuda_matmul_tf32("tf32"):
            pass


# Each way a user can ask torch for tf32 (or refuse it), in a fresh process: the settings are global.
@pytest.mark.parametrize("setting,expected", [
    ("", False),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('highest')", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.fp32_precision = 'tf32'", True),
])
def test_reads_what_the_user_set(setting, expected):
    has_new = hasattr(type(torch.backends.cuda.matmul), "__getattr__") and _new_api()
    if "fp32_precision" in setting and not has_new:
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    code = ("import warnings; warnings.simplefilter('ignore'); import torch\n" + setting + "\n"
            "from fastlora.kernels._torch_compat import cuda_matmul_allows_tf32 as f; print(f())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"TRITON_INTERPRET": "1", **__import__("os").environ})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)


def _new_api():
    try:
        torch.backends.cuda.matmul.fp32_precision  # noqa: B018
    except AttributeError:
        return False
    return True
