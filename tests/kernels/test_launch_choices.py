"""The launch policy (kernels/policy.py), which only a GPU would otherwise exercise: one policy for every kernel
(single adapter, multi adapter, DoRA norm), the dot precision each launch receives per dtype pair, the rank block,
the tile config rule and its SM cap, the tune cache, the interpreter's config — and that nothing is timed inside a
call.

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
from fastlora.ops.bank import AdapterBank
from fastlora.ops.dora import dora_linear
from fastlora.kernels import dora_norm, linear_bwd, linear_fwd, multi_lora, policy
from fastlora.kernels._specs import SPEC_DTYPES, TORCH_DTYPES
from fastlora.kernels._torch_compat import cuda_matmul_tf32
from fastlora.ops.multi import multi_lora_linear
from fastlora.ops.multi_plan import TILE_M
from tests._launches import launches  # noqa: F401  (the fixture)

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("x_dtype", HALF)
def test_fp32_adapters_on_half_base_get_tf32x3_for_gradient_dots(x_dtype):
    assert policy.lora_precision(x_dtype, torch.float32) == "tf32x3"
    assert policy.lora_precision(x_dtype, x_dtype) == "tf32"          # S / dS rounded next to half data
    assert policy.fp32_precision(x_dtype) == "tf32"                   # y and dx are rounded to half
    # tile tiers: tf32x3 dots need fp32-sized registers; kernels without an "x3" list use their "fp32" one
    assert policy.tier("shrink", x_dtype, "tf32x3") == "fp32" and policy.tier("shrink", x_dtype, "tf32") == "half"
    assert policy.tier("multi_shrink", x_dtype, "tf32x3") == "x3"
    assert policy.tier("multi_expand", x_dtype, "tf32", dropout=True) == "half+drop"
    assert policy.tier("multi_expand", torch.float32, "ieee", dropout=True) == "fp32+drop"
    assert policy.tier("dx", x_dtype, "tf32", dropout=True) == "half"      # no separate dropout list


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


def test_spec_dtypes_are_the_policys_precisions():
    """The compile check's dtype table (kernels/_specs.py) carries the precisions the policy gives those launches."""
    for xdt, adt, prec, lprec in SPEC_DTYPES:
        x, a = TORCH_DTYPES[xdt], TORCH_DTYPES[adt]
        with cuda_matmul_tf32(prec == "tf32"):
            assert (policy.fp32_precision(x), policy.lora_precision(x, a)) == (prec, lprec), (xdt, adt)
    assert {(x, a) for x, a, _, _ in SPEC_DTYPES} == {(h, a) for h in ("bf16", "fp16") for a in (h, "fp32")} | \
        {("fp32", "fp32")}
    assert {p for x, _, p, _ in SPEC_DTYPES if x == "fp32"} == {"ieee", "tf32"}


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
        cands = policy.CANDIDATES[kernel][policy.tier(kernel, dt, prec)]
        assert policy.config(kernel, dt, prec, 16384, 8192, 16, cpu) == cands[0]


@pytest.mark.parametrize("kernel", [k for k in policy.KERNELS if len(policy.CANDIDATES[k]["half"]) > 1])
def test_rule_uses_smaller_tiles_when_programs_would_leave_sms_idle(gpu_policy, kernel):
    """128 tokens at d 1024: the first candidate launches a handful of programs; the rule picks the candidate
    with the most programs (up to the SM count), never one outside the shipped list."""
    cfg = policy.config(kernel, torch.bfloat16, "tf32", 128, 1024, 16, torch.device("cpu"))
    cands = policy.CANDIDATES[kernel]["half"]
    assert cfg in cands
    progs = lambda c: policy._programs(kernel, c, 128, 1024, 16)  # noqa: E731
    assert progs(cfg) >= progs(cands[0])
    assert progs(cfg) == max(min(progs(c), 132) for c in cands)


def test_rule_caps_program_counts_at_the_sm_count(monkeypatch):
    """On a (fake) 5-SM GPU, 128 tokens at N = 256: the first expand tile launches 4 programs (< 5 SMs), and two
    smaller tiles launch 8 and 16, both more than the SMs can hold. Counted up to the SM count they tie, so the
    rule keeps the earlier (larger) tile; without the cap it would take the 16-program one."""
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "device_info", lambda device: ("Few-SM GPU", 5))   # the policy's device hook
    monkeypatch.setattr(policy, "_tuned", {})                                       # no tune cache
    cands = policy.CANDIDATES["expand"]["half"]
    progs = [policy._programs("expand", c, 128, 256, 16) for c in cands]
    assert progs == [4, 2, 8, 16]
    assert policy.config("expand", torch.bfloat16, "tf32", 128, 256, 16, torch.device("cpu")) == cands[2]
    # on a 132-SM GPU no candidate reaches the SM count: the most programs wins
    monkeypatch.setattr(policy, "device_info", lambda device: ("Big GPU", 132))
    assert policy.config("expand", torch.bfloat16, "tf32", 128, 256, 16, torch.device("cpu")) == cands[3]


def test_interpreter_runs_one_small_config():
    assert policy.interpreting()
    for kernel in policy.KERNELS:
        for tier_ in policy.CANDIDATES[kernel]:
            assert policy.candidates(kernel, tier_) == [policy.INTERPRETER[kernel]]
        assert policy.config(kernel, torch.float32, "ieee", 4096, 4096, 64, torch.device("cpu")) == \
            policy.INTERPRETER[kernel]


def test_compile_specs_are_the_shipped_gpu_configs_and_leave_the_environment_alone():
    """Under the interpreter (as here) the compile check still lists the shipped GPU configs, read from the
    policy's tables, without touching os.environ (the multi-adapter specs used to unset TRITON_INTERPRET)."""
    import os
    env = dict(os.environ)
    shipped = [c for k in policy.KERNELS for t in policy.CANDIDATES[k].values() for c in t]
    for mod in (linear_fwd, linear_bwd, multi_lora, dora_norm):
        specs = mod.compile_specs()
        assert specs and dict(os.environ) == env, mod.__name__
        for s in specs:
            cfg = {k: v for k, v in s.constexprs.items() if k.startswith("BLOCK_") and k != "BLOCK_R"}
            assert any(cfg.items() <= c.items() and (c["num_warps"], c["num_stages"]) == (s.num_warps, s.num_stages)
                       for c in shipped), s.name
    assert any(s.constexprs["BLOCK_C"] == 64 for s in multi_lora.compile_specs())     # the x3 multi shrink list


def test_every_candidate_has_launch_options_and_tl_dot_legal_blocks():
    for kernel, tiers in policy.CANDIDATES.items():
        for tier_, cands in tiers.items():
            assert cands, (kernel, tier_)
            for c in cands:
                meta, opts = policy.launch_options(c)
                assert set(opts) == {"num_warps", "num_stages"} and ("BLOCK_M" in meta or "BLOCK_N" in meta)
                assert all(v >= 16 and v == triton.next_power_of_2(v) for v in meta.values()), (kernel, c)


def test_multi_adapter_lists():
    """One config per tier (the plan's tiles are not chosen per call); the shrink and expand tiles are the batch
    plan's tile (interpreter too); tf32x3 dots halve the shrink's BLOCK_C; the expand with dropout (dx) keeps
    one stage (2 spilled 16 B on sm_80 for fp16)."""
    for kernel in ("multi_shrink", "multi_expand", "multi_grad"):
        assert all(len(c) == 1 for c in policy.CANDIDATES[kernel].values()), kernel
    for kernel in ("multi_shrink", "multi_expand"):
        assert {c[0]["BLOCK_M"] for c in policy.CANDIDATES[kernel].values()} == {TILE_M}
        assert policy.INTERPRETER[kernel]["BLOCK_M"] == TILE_M
    shrink = policy.CANDIDATES["multi_shrink"]
    assert shrink["x3"][0]["BLOCK_C"] < shrink["half"][0]["BLOCK_C"] == shrink["fp32"][0]["BLOCK_C"]
    expand = policy.CANDIDATES["multi_expand"]
    assert expand["half+drop"][0]["num_stages"] == expand["fp32+drop"][0]["num_stages"] == 1
    assert expand["half"][0]["num_stages"] == 2


def test_every_launcher_asks_the_policy(monkeypatch):
    """Each kernel's launcher takes its config from policy.config (nothing else picks configs): a forward and
    backward of the single-adapter, multi-adapter and DoRA ops asks for every kernel of the policy's tables."""
    asked = []
    real = policy.config
    monkeypatch.setattr(policy, "config", lambda kernel, *a, **k: asked.append(kernel) or real(kernel, *a, **k))
    g = torch.Generator().manual_seed(0)
    K, N = 20, 12
    x = torch.randn(9, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, requires_grad=True)
    A, B = torch.randn(3, K, requires_grad=True), torch.randn(N, 3, requires_grad=True)
    fastlora.lora_linear(x, W, b, A, B, 0.5, 0.1, seed=1, backend="triton").sum().backward()
    bank = AdapterBank(K, N, requires_grad=True)
    bank.add("a", torch.randn(3, K, generator=g), torch.randn(N, 3, generator=g), alpha=3)
    ids = torch.tensor([0, -1, 0, 0, -1, 0, 0, 0, 0], dtype=torch.int32)
    multi_lora_linear(x, W, b, bank, ids, 0.1, seed=1, backend="triton").sum().backward()
    m = torch.rand(N, generator=g, requires_grad=True)
    dora_linear(x, W, b, A, B, m, 0.5, backend="triton").sum().backward()
    assert set(asked) == set(policy.KERNELS), set(policy.KERNELS) ^ set(asked)


# ---------------------------------------------------------------------------
# the precision each launch receives (a spy on the launches: tests/_launches.py)
# ---------------------------------------------------------------------------

# kernel -> expected FP32_PRECISION (and DA_PRECISION for the dx kernel) per (x, adapters) dtype pair, written out
# (not derived from the policy's functions): training saves S for dB, so the training shrink gets the gradient
# dots' precision; the eval shrink and the expand round to the base dtype.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
EXPECTED = {
    (BF16, BF16): dict(train_shrink="tf32", eval_shrink="tf32", expand="tf32", dsdb="tf32", dx=("tf32", "tf32"),
                       multi_shrink="tf32", multi_expand="tf32", multi_grad="tf32", dora="tf32"),
    (BF16, F32): dict(train_shrink="tf32x3", eval_shrink="tf32", expand="tf32", dsdb="tf32x3", dx=("tf32", "tf32x3"),
                      multi_shrink="tf32x3", multi_expand="tf32", multi_grad="tf32x3", dora="tf32"),
    (F16, F32): dict(train_shrink="tf32x3", eval_shrink="tf32", expand="tf32", dsdb="tf32x3", dx=("tf32", "tf32x3"),
                     multi_shrink="tf32x3", multi_expand="tf32", multi_grad="tf32x3", dora="tf32"),
    (F32, F32): dict(train_shrink="ieee", eval_shrink="ieee", expand="ieee", dsdb="ieee", dx=("ieee", "ieee"),
                     multi_shrink="ieee", multi_expand="ieee", multi_grad="ieee", dora="ieee"),
}


def _precisions(launches, kernel):
    return {(r.meta["FP32_PRECISION"], r.meta.get("DA_PRECISION")) for r in launches if r.kernel == kernel}


@pytest.mark.parametrize("xdt,adt", list(EXPECTED), ids=lambda d: str(d).split(".")[-1])
def test_each_launch_receives_its_precision_tier(launches, xdt, adt):
    """Every kernel launch, per dtype pair, gets the dot precision of its tier: on a half base with fp32 adapters,
    tf32x3 for the dots that produce or feed adapter gradients (the S-saving shrink, dS/dB, dA, the multi shrink
    and gradient kernels), tf32 for those rounded to the base dtype. (The interpreter computes every dot exactly,
    so only a GPU would see the numbers; the spy sees the argument.)"""
    want = EXPECTED[xdt, adt]
    g = torch.Generator().manual_seed(0)
    K, N, M = 24, 20, 18
    x = torch.randn(M, K, generator=g).to(xdt).requires_grad_()
    W, b = torch.randn(N, K, generator=g).to(xdt), torch.randn(N, generator=g).to(xdt)
    A = (0.3 * torch.randn(4, K, generator=g)).to(adt).requires_grad_()
    B = (0.3 * torch.randn(N, 4, generator=g)).to(adt).requires_grad_()
    with cuda_matmul_tf32(False):                # fp32: torch's default (ieee)
        fastlora.lora_linear(x, W, b, A, B, 0.5, 0.1, seed=1, backend="triton").float().sum().backward()
        train = list(launches)
        launches.clear()
        with torch.no_grad():
            fastlora.lora_linear(x, W, b, A, B, 0.5, 0.1, seed=1, backend="triton")
        evaluate = list(launches)
        launches.clear()
        bank = AdapterBank(K, N, dtype=adt, requires_grad=True)
        bank.add("a", torch.randn(4, K, generator=g), torch.randn(N, 4, generator=g), alpha=4)
        ids = torch.tensor([0, -1] * (M // 2), dtype=torch.int32)
        multi_lora_linear(x, W, b, bank, ids, 0.1, seed=1, backend="triton").float().sum().backward()
        multi = list(launches)
        launches.clear()
        m = torch.rand(N, generator=g).to(adt).requires_grad_()
        dora_linear(x, W, b, A, B, m, 0.5, backend="triton").float().sum().backward()
        dora = list(launches)
    assert _precisions(train, "_lora_shrink_kernel") == {(want["train_shrink"], None)}
    assert _precisions(evaluate, "_lora_shrink_kernel") == {(want["eval_shrink"], None)}
    assert _precisions(train + evaluate, "_lora_expand_kernel") == {(want["expand"], None)}
    assert _precisions(train, "_lora_bwd_dsdb_kernel") == {(want["dsdb"], None)}
    assert _precisions(train, "_lora_bwd_dx_kernel") == {want["dx"]}
    assert _precisions(multi, "_shrink_kernel") == {(want["multi_shrink"], None)}     # S and dS
    assert _precisions(multi, "_expand_kernel") == {(want["multi_expand"], None)}     # y and dx
    assert _precisions(multi, "_grad_kernel") == {(want["multi_grad"], None)}         # dA and dB
    assert _precisions(dora, "_dora_norm_kernel") == {(want["dora"], None)}


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


def test_tune_cache_is_read_again_after_each_write(gpu_policy):
    """Two successive writes of DIFFERENT configs for the same key and device: launches read the second."""
    cpu = torch.device("cpu")
    cands = policy.CANDIDATES["dx"]["half"]
    key = policy.cache_key("dx", "half", 3000, 4096, 16)
    assert policy.config("dx", torch.bfloat16, "tf32", 3000, 4096, 16, cpu) == cands[0]      # nothing tuned yet
    policy.write_cache(str(gpu_policy), "Fake GPU", {key: cands[2]})
    assert policy.config("dx", torch.bfloat16, "tf32", 3000, 4096, 16, cpu) == cands[2]
    policy.write_cache(str(gpu_policy), "Fake GPU", {key: cands[1]})
    assert policy.config("dx", torch.bfloat16, "tf32", 3000, 4096, 16, cpu) == cands[1]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 0, "devices": {}}),
                                     json.dumps({"version": policy.CACHE_VERSION, "devices": {"Fake GPU": {
                                         "expand/half/4096/4096/16": {"BLOCK_M": 7, "BLOCK_N": 7,
                                                                      "num_warps": 4, "num_stages": 2}}}}),
                                     json.dumps({"version": policy.CACHE_VERSION, "devices": {"Fake GPU": {
                                         "multi_shrink/half/4096/4096/16": policy.CANDIDATES["multi_shrink"]["half"][0]
                                     }}})],
                         ids=["not-json", "old-version", "unshipped-config", "untuned-kernel"])
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
    assert len(timed) == 4 and set(k.split("/")[0] for k in entries) == set(policy.TUNED)
    assert policy.read_cache(str(path)) == {"interpreter": entries}


def test_tune_refuses_without_a_gpu(monkeypatch):
    """(On a CPU only the interpreter's smoke run is allowed: tests/repo/test_benchmarks.py.)"""
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
    for mod in (linear_fwd, linear_bwd, multi_lora, dora_norm):
        assert not [n for n, v in vars(mod).items() if isinstance(v, triton.runtime.autotuner.Autotuner)], mod
