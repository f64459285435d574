"""Compile-for-GPU check without a GPU: the shipped kernel configs build PTX + cubin for sm_80 and sm_90
with zero spill bytes and shared memory within the target's limit (python -m fastlora.inspect).

The interpreter replaces kernels and config lists, so the CLI runs in a subprocess without
TRITON_INTERPRET. CI compiles every shipped config of every kernel on a bf16 base (bf16 adapters: the
half-precision tile lists; fp32 adapters: their tf32x3 gradient dots and tile lists) and at fp32/ieee
(the fp32 tile lists), with dropout on and both reduction modes;
`python -m fastlora.inspect` with no argument compiles the full matrix (all dtypes, precisions and flags,
docs/inspect_report.txt).
"""
import os
import re
import subprocess
import sys

import pytest

# heaviest combination per kernel family; every tile/warp/stage config of each is included
CI_SUBSET = (r"(x=bf16 ab=(bf16|fp32)[^ ]*|x=fp32 ab=fp32(/ieee)?) (drop=1|atomic=\d \d|atomic=\d drop=1)"
             r"|^lora_expand (x=bf16|x=fp32 ab=fp32/ieee) ")          # expand has no dropout / atomics flag


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run([sys.executable, "-m", "fastlora.inspect", "--only", CI_SUBSET],
                          capture_output=True, text=True, env=_env(), timeout=900)
    return proc


def test_every_shipped_config_compiles_without_spills(report):
    assert report.returncode == 0, report.stdout[-6000:] + report.stderr[-3000:]
    rows = [line for line in report.stdout.splitlines() if re.search(r"\s(80|90)\s", line)]
    assert rows, report.stdout
    # both targets for every config (the sm column is 6th from the right), every row ok
    sms = [r.split()[-6] for r in rows]
    assert sms.count("80") == sms.count("90") == len(rows) // 2, sms
    assert all(r.rstrip().endswith("ok") for r in rows), "\n".join(r for r in rows if not r.rstrip().endswith("ok"))
    for fam in ("lora_shrink", "lora_expand", "lora_bwd_dsdb", "lora_bwd_dx"):
        assert any(r.startswith(fam) for r in rows), f"no {fam} config compiled"


SPILLER = '''
import triton, triton.language as tl
@triton.jit
def hog(x_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    acc = tl.dot(acc, acc)
    tl.store(x_ptr + r[:, None] * BLOCK + r[None, :], acc)
'''


def test_checker_reports_spills(tmp_path):
    """The check can fail: a kernel holding a 128x128 fp32 tile in one warp (512 values per thread, over
    the 255-register limit) must be reported as spilling. (A 256x256 tile with 8 chained dots took ptxas
    over 5 minutes and 5 GB on a CI machine; this one takes ~10 s.)"""
    (tmp_path / "hogmod.py").write_text(SPILLER)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from hogmod import hog\n"
        "from fastlora.kernels._specs import CompileSpec\n"
        "from fastlora.inspect import compile_one\n"
        "spec = CompileSpec('hog', hog, {'x_ptr': '*fp32', 'BLOCK': 'constexpr'}, {'BLOCK': 128}, 1, 1)\n"
        "r = compile_one(spec, 80)\n"
        "print(r['spill'], r['error'])\n" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    spill, *err = out.stdout.split()
    assert int(spill) > 0 and "spills" in err


def test_cli_rejects_bad_target():
    out = subprocess.run([sys.executable, "-m", "fastlora.inspect", "--targets", "75"], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode != 0 and "--targets" in out.stderr
