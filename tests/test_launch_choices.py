"""The launch policy (fastlora/kernels/policy.py), which only a GPU would otherwise exercise: dot precision per
dtype pair, the rank block, the tile config rule, the tune cache — and that nothing is timed inside a call.

An H200 run (benchmarks/results/h200_2026-11-26/) showed fp32 adapters on a half base getting dA with
~2^-11 relative errors from tf32 dots; the precision choices are the fix, and the CPU suite cannot run tf32,
so here they are pinned down directly.
"""
from __future__ import annotations

import json

import pytest
import torch
import triton

import fastlora
from fastlora.kernels import multi_lora, policy
from fastlora.kernels._torch_compat import cuda_matmul_tf32

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("x_dtype", HALF)
def test_fp32_adapters_on_half_base_get_tf32x3_for_gradient_dots(x_dtype):
    assert policy.lora_precision(x_dtype, torch.float32) == "tf32x3"
    assert policy.lora_precision(x_dtype, x_dtype) == "tf32"          # S / dS rounded next to half data
    assert policy.fp32_precision(x_dtype) == "tf32"                   # y and dx are rounded to half
    assert policy.tier(x_dtype, "tf32x3") == "fp32" and policy.tier(x_dtype, "tf32") == "half"


def test_fp32_base_follows_torch_matmul_setting():
    # set and restored through torch's current API (fp32_precision) where it exists; the kernels must read
    # it through the same API (reading the deprecated allow_tf32 after it raises in torch >= 2.9)
    with cuda_matmul_tf32(False):
        assert policy.lora_precision(torch.float32, torch.float32) == "ieee"
    with cuda_matmul_tf32(True):
        assert policy.lora_precision(torch.float32, torch.float32) == "tf32"
        assert policy.lora_precision(torch.float64, torch.float64) == "ieee"


def test_rank_block_is_capped_for_tf32x3():
    assert [policy.block_r(r) for r in (1, 16, 17, 64, 200)] == [16, 16, 32, 64, 64]
    assert [policy.block_r(r, "tf32x3") for r in (1, 16, 17, 64, 200)] == [16, 16, 32, 32, 32]


def test_multi_shrink_block_for_tf32x3(monkeypatch):
    from fastlora.multi_plan import TILE_M
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert multi_lora._cfg("shrink", "tf32x3")["BLOCK_C"] < multi_lora._cfg("shrink")["BLOCK_C"]
    for kernel in ("shrink", "expand"):          # the plan's tile size never depends on precision or dropout
        for prec in ("tf32", "tf32x3", "ieee"):
            for drop in (False, True):
                assert multi_lora._cfg(kernel, prec, drop)["BLOCK_M"] == TILE_M
    assert multi_lora._cfg("expand", dropout=True)["num_stages"] == 1       # 2 stages spill on sm_80 (fp16, dx)


# ---------------------------------------------------------------------------
# tile configs: a fixed rule that counts programs against SMs
# ---------------------------------------------------------------------------

@pytest.fixture
def gpu_policy(monkeypatch, tmp_path):
    """The policy as it runs on a (fake) 132-SM GPU: the interpreter switch off, a private cache file."""
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "device_info", lambda device: ("Fake GPU", 132))
    monkeypatch.setenv(policy.CACHE_ENV, str(tmp_path / "tune.json"))
    policy.reset()
    yield tmp_path / "tune.json"
    policy.reset()


@pytest.mark.parametrize("kernel", policy.KERNELS)
def test_rule_takes_the_first_candidate_when_the_gpu_is_full(gpu_policy, kernel):
    cpu = torch.device("cpu")
    for dt, prec in ((torch.bfloat16, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "tf32x3")):
        assert policy.config(kernel, dt, prec, 16384, 8192, 16, cpu) == policy.CANDIDATES[kernel][policy.tier(dt, prec)][0]


@pytest.mark.parametrize("kernel", policy.KERNELS)
def test_rule_uses_smaller_tiles_when_programs_would_leave_sms_idle(gpu_policy, kernel):
    """128 tokens at d 1024: the first candidate launches a handful of programs; the rule picks the candidate
    with the most programs (up to the SM count), never one outside the shipped list."""
    cfg = policy.config(kernel, torch.bfloat16, "tf32", 128, 1024, 16, torch.device("cpu"))
    cands = policy.CANDIDATES[kernel]["half"]
    assert cfg in cands
    progs = lambda c: policy._programs(kernel, c, 128, 1024, 16)  # noqa: E731
    assert progs(cfg) >= progs(cands[0])
    assert progs(cfg) == max(min(progs(c), 132) for c in cands)


def test_interpreter_runs_one_small_config():
    assert policy.interpreting()
    for kernel in policy.KERNELS:
        assert policy.candidates(kernel, "half") == [policy.INTERPRETER[kernel]]
        assert policy.config(kernel, torch.float32, "ieee", 4096, 4096, 64, torch.device("cpu")) == \
            policy.INTERPRETER[kernel]


def test_every_candidate_has_launch_options_and_tl_dot_legal_blocks():
    for kernel, tiers in policy.CANDIDATES.items():
        for tier_, cands in tiers.items():
            assert cands, (kernel, tier_)
            for c in cands:
                meta, opts = policy.launch_options(c)
                assert set(opts) == {"num_warps", "num_stages"} and "BLOCK_M" in meta
                assert all(v >= 16 and v == triton.next_power_of_2(v) for v in meta.values()), (kernel, c)


# ---------------------------------------------------------------------------
# the tune cache
# ---------------------------------------------------------------------------

def test_tune_cache_round_trip(gpu_policy):
    cpu = torch.device("cpu")
    pick = policy.CANDIDATES["expand"]["half"][2]
    key = policy.cache_key("expand", "half", 3000, 4096, 16)
    assert key == "expand/half/4096/4096/16"
    policy.write_cache(str(gpu_policy), "Fake GPU", {key: pick})
    assert policy.config("expand", torch.bfloat16, "tf32", 3000, 4096, 16, cpu) == pick      # same bucket
    assert policy.config("expand", torch.bfloat16, "tf32", 5000, 4096, 16, cpu) == \
        policy.CANDIDATES["expand"]["half"][0]                                                # other bucket: rule
    policy.write_cache(str(gpu_policy), "Other GPU", {key: policy.CANDIDATES["expand"]["half"][1]})
    data = json.loads(gpu_policy.read_text())
    assert set(data["devices"]) == {"Fake GPU", "Other GPU"}                                  # merged, not replaced
    assert policy.config("expand", torch.bfloat16, "tf32", 3000, 4096, 16, cpu) == pick


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 0, "devices": {}}),
                                     json.dumps({"version": policy.CACHE_VERSION, "devices": {"Fake GPU": {
                                         "expand/half/4096/4096/16": {"BLOCK_M": 7, "BLOCK_N": 7,
                                                                      "num_warps": 4, "num_stages": 2}}}})])
def test_corrupt_or_stale_cache_warns_and_uses_the_defaults(gpu_policy, content):
    gpu_policy.write_text(content)
    with pytest.warns(UserWarning, match="ignoring the tune cache"):
        cfg = policy.config("expand", torch.bfloat16, "tf32", 3000, 4096, 16, torch.device("cpu"))
    assert cfg == policy.CANDIDATES["expand"]["half"][0]


def test_tune_writes_what_it_timed(tmp_path):
    """fastlora.tune on the interpreter with a fake timer: every kernel timed, one entry each, read back."""
    path = tmp_path / "t.json"
    timed = []
    entries = fastlora.tune([20], [(24, 40)], [3], dtype=torch.float32, device="cpu", path=str(path),
                            timer=lambda fn: timed.append(fn()) or 1.0)
    assert len(timed) == 4 and set(k.split("/")[0] for k in entries) == set(policy.KERNELS)
    assert policy.read_cache(str(path)) == {"interpreter": entries}


def test_tune_refuses_without_a_gpu(monkeypatch):
    """(On a CPU only the interpreter's smoke run is allowed: tests/test_benchmarks.py.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device"):
        fastlora.tune([16], [(16, 16)], device="cpu")


# ---------------------------------------------------------------------------
# nothing timed, nothing autotuned inside a user's call
# ---------------------------------------------------------------------------

def test_no_timing_inside_forward_or_backward(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("timed inside a user's call")
    monkeypatch.setattr(triton.testing, "do_bench", boom)
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", boom)
    x = torch.randn(2, 9, 24, requires_grad=True)
    W, b = torch.randn(20, 24), torch.randn(20, requires_grad=True)
    A, B = torch.randn(4, 24, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    for p in (0.0, 0.2):
        for det in (False, True):
            y = fastlora.lora_linear(x, W, b, A, B, 0.5, p, seed=1, backend="triton", deterministic=det)
            y.sum().backward()
    from fastlora.kernels import linear_bwd, linear_fwd
    for mod in (linear_fwd, linear_bwd, multi_lora):
        assert not [n for n, v in vars(mod).items() if isinstance(v, triton.runtime.autotuner.Autotuner)], mod
