"""The benchmark code, at tiny settings: it runs, writes well-formed CSVs and plots, the adapter
variants are placed and counted as the paper says, the LoRA rows compute what PEFT computes, bad
options fail clearly, and the traffic model is self-consistent.

Model-level runs use fastlora's pure-torch backend (TRITON_INTERPRET=0 for the test): the kernels'
correctness is the parity suite's job; here the subject is the benchmark harness, and the
interpreter would make a GPT-2 forward far too slow for the budget.
"""
from __future__ import annotations

import csv
import datetime as dt

import pytest
import torch

from benchmarks import adapters as adp
from benchmarks import common, paper_table, plot, traffic
# Imported here, at collection, while conftest's TRITON_INTERPRET=1 holds: Triton fixes a kernel's mode when
# its module is imported, and the torch_backend fixture below sets TRITON_INTERPRET=0 for model-level tests.
from fastlora.kernels import dora_norm, linear_bwd, linear_fwd, multi_lora  # noqa: E402,F401  (interpreter mode)

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--bottleneck", "3", "--no-progress"]


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")      # fastlora's dispatch reads it per call
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")


def tiny_cfg(**kw):
    args = paper_table.parser().parse_args(TINY + ["--trials", "1", "--warmup", "0"])
    cfg = paper_table.make_config(args)
    cfg.vocab = 97
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------- adapters

@pytest.mark.parametrize("kind", ["H", "L"])
@pytest.mark.parametrize("n_layer,d,r", [(2, 32, 3), (3, 48, 1), (1, 16, 7)])
def test_adapter_param_count_matches_paper_formula(kind, n_layer, d, r):
    from transformers import GPT2Config, GPT2Model
    model = GPT2Model(GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, vocab_size=11, n_positions=16))
    added = adp.add_adapters(model, kind, r)
    assert len(added) == n_layer * (2 if kind == "H" else 1)
    assert adp.adapter_param_count(added) == adp.paper_param_count(kind, n_layer, d, r)
    # placement: H on attn and mlp output projections, L only on the MLP's, with a LayerNorm
    blk = model.h[0]
    assert isinstance(blk.mlp.c_proj, adp.WithAdapter)
    assert isinstance(blk.attn.c_proj, adp.WithAdapter) == (kind == "H")
    assert (blk.mlp.c_proj.adapter.ln is not None) == (kind == "L")


@pytest.mark.parametrize("kind", ["H", "L"])
@pytest.mark.parametrize("target", [0.5e6, 11e6])
def test_bottleneck_is_the_closest_to_the_paper_budget(kind, target):
    r = adp.bottleneck_for(kind, 24, 1024, target)
    err = lambda q: abs(adp.paper_param_count(kind, 24, 1024, q) - target)  # noqa: E731
    assert all(err(r) <= err(q) for q in range(1, 600)), r
    assert err(r) / target < 0.1


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="adapter kind"):
        adp.paper_param_count("X", 2, 8, 1)
    with pytest.raises(ValueError, match="bottleneck r"):
        adp.Adapter(8, 0)
    with pytest.raises(ValueError, match="target_params"):
        adp.bottleneck_for("L", 2, 8, -1)


# ----------------------------------------------------------------------------- model variants

@pytest.mark.parametrize("row", ["AdapterL", "AdapterH", "LoRA PEFT", "LoRA fastlora"])
def test_zero_initialised_variants_give_the_base_output(row, torch_backend):
    cfg = tiny_cfg()
    base = paper_table.build_base(cfg)
    ids = paper_table._inputs(cfg, "1x128")
    with torch.no_grad():
        y0 = paper_table.forward(base, ids)
        m0, _, _ = paper_table.make_variant(base, row, cfg, "1x128", zero_init=True)
        m1, _, _ = paper_table.make_variant(base, row, cfg, "1x128", zero_init=False)
        y_zero, y_rand = paper_table.forward(m0, ids), paper_table.forward(m1, ids)
    # zero up-projection / B = 0 adds exact zeros: same numbers as the base model (bitwise for the
    # module chains; the fused op may order the base GEMM differently, so allow fp32 rounding there)
    torch.testing.assert_close(y_zero, y0, rtol=0 if row != "LoRA fastlora" else 1e-5,
                               atol=0 if row != "LoRA fastlora" else 1e-6)
    # and the variant is really in the forward path: random weights change the output
    assert (y_rand - y0).abs().max() > 1e-4
    assert paper_table.forward(base, ids).equal(y0)          # the base model was not modified


def test_fastlora_row_matches_peft_row_and_float64(torch_backend):
    """fastlora's row vs PEFT's row: error vs a float64 copy of the PEFT model ≤ 2× PEFT's fp32
    error + 1e-5·max|y| (fp32 rounding differs by GEMM order; both must stay within ~1e-6 rel.)."""
    from fastlora.integrations.patching import is_patched
    cfg = tiny_cfg()
    base = paper_table.build_base(cfg)
    ids = paper_table._inputs(cfg, "1x128")
    peft, _, _ = paper_table.make_variant(base, "LoRA PEFT", cfg, "1x128")
    fused, n_params, _ = paper_table.make_variant(base, "LoRA fastlora", cfg, "1x128")
    assert n_params == cfg.n_layer * paper_table.LORA_R * (cfg.n_embd + 3 * cfg.n_embd)
    assert sum(is_patched(m) for m in fused.modules()) == cfg.n_layer
    oracle = copy_double(peft)
    with torch.no_grad():
        y64 = paper_table.forward(oracle, ids)
        y_peft, y_fused = paper_table.forward(peft, ids), paper_table.forward(fused, ids)
    e_peft = (y_peft.double() - y64).abs().max().item()
    e_fused = (y_fused.double() - y64).abs().max().item()
    assert e_fused <= 2 * e_peft + 1e-5 * y64.abs().max().item(), (e_fused, e_peft)


def copy_double(model):
    import copy
    return copy.deepcopy(model).double()


def test_multi_adapter_row_matches_peft_mixed_batch(torch_backend):
    cfg = tiny_cfg()
    base = paper_table.build_base(cfg)
    model, params, _ = paper_table.multi_adapter_row(base, cfg, "16x256")   # raises if it disagrees with PEFT
    assert params == 16 * cfg.n_layer * paper_table.LORA_R * 4 * cfg.n_embd
    assert model.names == [f"a{i}" for i in range(16)]


def test_multi_adapter_row_half_precision_uses_the_idiom(torch_backend):
    """In float16 the row is checked against a float32 run of the PEFT model (2x PEFT's own error)."""
    cfg = tiny_cfg(dtype=torch.float16)
    made = paper_table.multi_adapter_row(paper_table.build_base(cfg), cfg, "16x256")
    assert made is not None and made[1] == 16 * cfg.n_layer * paper_table.LORA_R * 4 * cfg.n_embd


@pytest.mark.parametrize("row", ["merged", "AdapterH", "LoRA PEFT", "LoRA fastlora", "fastlora multi-adapter"])
def test_decode_call_is_one_token_on_the_kv_cache(row, torch_backend):
    """The decode column's timed call: one new token on the model's own KV cache of the 128-token prompt = the
    last position of a full forward over prompt + token (fp32 rounding apart); reset crops the cache back, so a
    second step does the same work and gives the same numbers."""
    cfg = tiny_cfg()
    base = paper_table.build_base(cfg)
    if row == "fastlora multi-adapter":
        model = paper_table.multi_adapter_row(base, cfg, "decode")[0]      # checked against PEFT inside
    else:
        model = paper_table.make_variant(base, row, cfg, "decode")[0]
    call = paper_table.Call(model, cfg, "decode")
    assert call.cache.get_seq_length() == paper_table.DECODE_CACHE and call.ids.shape == (1, 1)
    with torch.inference_mode():
        step = call()
        assert call.cache.get_seq_length() == paper_table.DECODE_CACHE + 1
        call.reset()
        assert call.cache.get_seq_length() == paper_table.DECODE_CACHE
        again = call()
        call.reset()
        full = paper_table.forward(model, torch.cat([paper_table._inputs(cfg, "decode"), call.ids], 1))
    assert step.shape == (1, 1, cfg.n_embd) and torch.equal(step, again)
    torch.testing.assert_close(step, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_decode_rows_are_checked_against_peft(torch_backend, monkeypatch):
    """run() compares the fastlora row's decode step with PEFT's (the timed call itself) before timing."""
    cfg = tiny_cfg(columns=["decode"])
    seen = []
    real = paper_table.check_row
    monkeypatch.setattr(paper_table, "check_row", lambda row, out, ref, f32: seen.append((row, out.shape)) or
                        real(row, out, ref, f32))
    rows = paper_table.run(cfg, rows=("merged", "LoRA PEFT", "LoRA fastlora"))
    assert ("LoRA fastlora", (1, 1, cfg.n_embd)) in seen
    assert {r["row"] for r in rows} == {"merged", "LoRA PEFT", "LoRA fastlora", "fastlora multi-adapter"}
    assert all(r["column"] == "decode" and r["kv_cache"] == paper_table.DECODE_CACHE for r in rows)


def test_check_row_catches_a_wrong_row_not_rounding():
    g = torch.Generator().manual_seed(0)
    ref32 = torch.randn(4, 8, 16, generator=g)
    peft = (ref32 + 1e-3 * torch.randn(ref32.shape, generator=g)).half()      # PEFT's own half rounding
    close = (ref32 + 1.5e-3 * torch.randn(ref32.shape, generator=g)).half()
    paper_table.check_row("close", close, peft, lambda: ref32)               # within 2x PEFT's error
    wrong = close.clone()
    wrong[3] = torch.randn(8, 16, generator=g).half()                         # one sequence, other adapter
    with pytest.raises(RuntimeError, match="wrong row disagrees with PEFT"):
        paper_table.check_row("wrong", wrong, peft, lambda: ref32)
    with pytest.raises(RuntimeError, match="disagrees"):                     # float32 table: its own reference
        paper_table.check_row("f32", ref32 + 1e-3, ref32, None)


# ----------------------------------------------------------------------------- the CLI

def test_paper_table_main_writes_csv_and_png(tmp_path, torch_backend, capsys):
    """The CPU default: the batch-1 / seq-128 column and the decode column, every row in both."""
    rc = paper_table.main(TINY + ["--trials", "2", "--warmup", "0", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "--columns all" in out and "bottleneck r = 3" in out
    assert "decode: batch 1, one new token per step, KV cache 128" in out and "ms per token" in out
    (csv_path,) = tmp_path.glob("paper_table_cpu_float32.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == paper_table.CSV_COLUMNS
        rows = list(reader)
    expected = set(paper_table.ROWS) | {"fastlora multi-adapter"}
    for column in ("1x128", "decode"):
        assert {r["row"] for r in rows if r["column"] == column} == expected, column
    for r in rows:
        assert float(r["mean_ms"]) > 0 and float(r["std_ms"]) >= 0 and float(r["median_ms"]) > 0
        assert r["column"] in ("1x128", "decode") and r["trials"] == "2" and r["dtype"] == "float32"
        assert r["kv_cache"] == ("128" if r["column"] == "decode" else "")
        assert (r["batch"], r["seq"]) == (("1", "1") if r["column"] == "decode" else ("1", "128"))
        assert "torch=" in r["versions"] and "fastlora=" in r["versions"] and r["device"]
        dt.datetime.fromisoformat(r["timestamp"])
    merged = next(r for r in rows if r["row"] == "merged" and r["column"] == "1x128")
    assert float(merged["overhead_pct"]) == 0.0 and merged["paper_mean_ms"] == "19.8"
    assert merged["ratio"] == "1.0000" and merged["vs_merged"] == ""           # paired with itself
    assert all(r["paper_mean_ms"] == r["paper_overhead_pct"] == "" for r in rows if r["column"] == "decode")
    for r in rows:
        if r["row"] != "merged":
            assert float(r["ratio_lo"]) <= float(r["ratio"]) <= float(r["ratio_hi"])
            assert r["vs_merged"] == ("indistinguishable" if float(r["ratio_lo"]) <= 1 <= float(r["ratio_hi"])
                                      else "slower" if float(r["ratio_lo"]) > 1 else "faster")
    assert "ratio to merged" in out
    ad_h = next(r for r in rows if r["row"] == "AdapterH" and r["column"] == "1x128")
    assert float(ad_h["paper_overhead_pct"]) == pytest.approx(100 * (25.8 / 19.8 - 1), abs=0.05)
    assert int(ad_h["adapter_params"]) == adp.paper_param_count("H", 2, 32, 3)
    png = csv_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("opts,msg", [
    (["--columns", "1x128,64x64"], "unknown column"),
    (["--trials", "-3"], "--trials must be a positive"),
    (["--trials", "0"], "--trials must be a positive"),
    (["--device", "tpu"], "--device must be"),
    (["--device", "banana"], "--device must be"),
    (["--warmup", "-1"], "--warmup must be"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
])
def test_bad_options_are_clear_errors(opts, msg, capsys):
    with pytest.raises(ValueError, match=msg):
        paper_table.make_config(paper_table.parser().parse_args(opts))
    with pytest.raises(SystemExit) as e:          # the CLI turns them into a usage error, exit code 2
        paper_table.main(opts)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's error")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        paper_table.make_config(paper_table.parser().parse_args(["--device", "cuda"]))


def test_cpu_defaults_and_quick():
    mk = lambda *o: paper_table.make_config(paper_table.parser().parse_args(["--device", "cpu", *o]))  # noqa: E731
    cfg = mk()
    assert cfg.columns == ["1x128", "decode"] and cfg.trials == 10 and cfg.dtype == torch.float32 and cfg.notes
    assert mk("--quick").trials == 3
    assert mk("--columns", "all").columns == list(paper_table.COLUMNS) and not mk("--columns", "all").notes


# ----------------------------------------------------------------------------- CSV writer and plots

def test_csv_writer_rejects_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="differ from columns"):
        common.write_csv(tmp_path / "x.csv", ("a", "b"), [{"a": 1}])
    p = common.write_csv(tmp_path / "sub" / "x.csv", ("a", "b"), [{"a": 1, "b": 2}])
    assert common.read_csv(p) == [{"a": "1", "b": "2"}]


def test_quantile_matches_numpy():
    import numpy as np
    v = [5.0, 1.0, 4.0, 2.5, 9.0, 3.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert common.quantile(v, q) == pytest.approx(float(np.quantile(v, q)))


def test_micro_csv_plot(tmp_path):
    rows = [dict(kernel="lora_linear", provider=p, mode="fwd", shape="M8 K8 N8 r2", median_ms=m,
                 p20_ms=m * 0.9, p80_ms=m * 1.1, rounds=5, device="cpu", dtype="float32",
                 versions=common.versions(), timestamp=common.timestamp()) for p, m in (("base", 1.0), ("fastlora", 1.02))]
    path = common.write_csv(tmp_path / "m.csv", common.MICRO_COLUMNS, rows)
    assert plot.plot_csv(path).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="not a benchmark CSV"):
        plot.plot_csv(common.write_csv(tmp_path / "o.csv", ("x",), [{"x": 1}]))


# ----------------------------------------------------------------------------- traffic model

def test_traffic_model_sanity(tmp_path):
    for case, s in traffic.CASES:
        tot = {k: traffic.totals(fn(s), "H100 SXM") for k, fn in traffic.IMPLS.items()}
        eff = {k: traffic.effective(fn(s), "H100 SXM") for k, fn in traffic.IMPLS.items()}
        for k, t in tot.items():
            assert t["bytes"] > 0 and t["flops"] > 0 and t["model_time_us"] > 0 and t["launches"] >= 1, k
        base = tot[("fwd", "base GEMM")]
        for impl in ("PEFT", "torch composite", "fastlora anchored"):
            assert tot[("fwd", impl)]["bytes"] >= base["bytes"]          # nothing beats the base GEMM
            assert tot[("fwd", impl)]["flops"] >= base["flops"]
        fwd, bwd = tot[("fwd", "fastlora anchored")], tot[("bwd", "fastlora anchored")]
        assert fwd["launches"] == 3 and bwd["launches"] == 3
        # anchored forward = base GEMM + x read by the shrink + y0 written and read back + S (fp32) twice + A, B
        assert fwd["bytes"] - base["bytes"] == (s.M * s.K * s.b + 2 * s.M * s.N * s.b + 2 * s.M * s.r * 4
                                                 + (s.r * s.K + s.N * s.r) * s.ba)
        assert bwd["bytes"] < tot[("bwd", "PEFT")]["bytes"]
        for d in ("fwd", "bwd"):
            t = {impl: eff[(d, impl)]["kernel_us"] for impl in ("base GEMM", "fastlora anchored", "torch composite",
                                                                  "PEFT")}
            assert t["base GEMM"] < t["fastlora anchored"] <= t["PEFT"], (case, d)
            if s.M >= 4096:   # y0 / dx0's extra read hides under the compute-bound cuBLAS GEMM
                assert t["fastlora anchored"] < t["torch composite"], (case, d)
    padded, wp = traffic.multi_adapter(256, 128, 128, [4, 8, 64])
    packed, wk = traffic.multi_adapter(256, 128, 128, [4, 8, 64], packed=True)
    padded, wp = traffic.multi_adapter(256, 128, 128, [4, 8, 64], packed=False)
    assert wk < wp and sum(k.flops for k in packed) < sum(k.flops for k in padded)
    rows = traffic.model_rows()
    assert {r["label"] for r in rows} == {"model"} and {r["gpu"] for r in rows} == set(traffic.GPUS)
    assert not any("launch" in r["impl"] for r in rows)                 # the fused-GEMM variants are gone
    path = common.write_csv(tmp_path / "t.csv", traffic.CSV_COLUMNS, rows)
    assert plot.plot_csv(path).exists()


def test_traffic_model_predictions_and_program_counts():
    for gpu in traffic.GPUS:
        preds = traffic.predictions(gpu)
        assert len(preds) == 5 and all(p["value"] > 0 and p["met"] == (
            p["value"] <= p["bound"] if p["kind"] == "<=" else p["value"] >= p["bound"]) for p in preds)
        assert all(p["value"] > 1 for p in preds[:2])                    # a forward never beats the base GEMM
    # 128 tokens, d 1024, r 16: 2 row blocks of 64; expand / dx prologue 8 column tiles of 128; dS/dB split in 4
    assert traffic.programs(128, 1024, 1024, 16, 132) == {"shrink": 2, "expand": 16, "dS/dB": 8, "dx prologue": 16}
    assert traffic.programs(128, 1024, 1024, 16, 132, block_m=16)["shrink"] == 8


def test_traffic_model_roofline_formula():
    k = [traffic.Kernel("a", 3.35e6, 1.0), traffic.Kernel("b", 1.0, 989.4e6)]   # 1 µs memory, 1 µs compute
    t = traffic.totals(k, "H100 SXM")
    assert t["model_time_us"] == pytest.approx(2.0 + 2 * traffic.LAUNCH_US)
    assert traffic.Shape(1, 1, 1, 3).rp == 16 and traffic.Shape(1, 1, 1, 17).rp == 32


# ----------------------------------------------------------------------------- paired ratios, output folder

def test_ratio_interval_says_when_a_row_is_indistinguishable():
    # a busy machine: merged swings by ±30% between trials; this row's mean is 15% above merged, but its paired
    # per-trial ratios straddle 1 (1.30, 0.95, 1.30, 0.92, 1.28, 0.97): indistinguishable
    merged = [3000, 2100, 4300, 2500, 4000, 3100]
    noisy = [3900, 2000, 5600, 2300, 5100, 3000]
    r = paper_table.ratio_to_merged(noisy, merged)
    assert r["verdict"] == "indistinguishable" and r["lo"] < 1 < r["hi"]
    # a steady 10% overhead under the same swings is told apart: the pairing cancels the drift
    steady = [1.1 * m * (1 + 0.01 * (-1) ** i) for i, m in enumerate(merged)]
    r = paper_table.ratio_to_merged(steady, merged)
    assert r["verdict"] == "slower" and 1.05 < r["lo"] < r["ratio"] < r["hi"] < 1.15
    assert paper_table.ratio_to_merged([0.5 * m for m in steady], merged)["verdict"] == "faster"
    one = paper_table.ratio_to_merged([2.0], [1.0])                         # one trial: no interval
    assert one["ratio"] == pytest.approx(2.0) and one["verdict"] == "indistinguishable"
    with pytest.raises(ValueError, match="paired trials"):
        paper_table.ratio_to_merged([1.0, 2.0], [1.0])


def test_bench_multi_pairs_each_round(monkeypatch):
    """python -m benchmarks.bench_multi: every round times each provider once (rotating the order) and each ratio
    is that round's time over fastlora's; a fake clock that the calls advance makes the expected ratios exact."""
    import time
    from benchmarks import bench_multi
    clock, seen = [0.0], []

    def cost(name, dt):
        def call():
            seen.append(name)
            clock[0] += dt
        return call
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    r = bench_multi.paired({"fastlora": cost("f", 1.0), "peft": cost("p", 1.25), "base": cost("b", 0.8)}, rounds=6)
    assert r["peft"] == pytest.approx([1.25] * 6) and r["base"] == pytest.approx([0.8] * 6) and "fastlora" not in r
    rounds = [seen[6 + 3 * i: 9 + 3 * i] for i in range(6)]                   # after two warm-up calls each
    assert all(sorted(o) == ["b", "f", "p"] for o in rounds) and len({tuple(o) for o in rounds}) == 3


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000):
        assert common.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    import math
    logs = [math.log(v) for v in (1.3, 0.95, 1.3, 0.92, 1.28, 0.97)]
    lo, hi = stats.t.interval(0.95, len(logs) - 1, loc=sum(logs) / 6, scale=stats.sem(logs))
    _, lo2, hi2 = common.ratio_interval([1.3, 0.95, 1.3, 0.92, 1.28, 0.97])
    assert (lo2, hi2) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-3)


def test_output_folder_rule(tmp_path, monkeypatch, capsys):
    """Default: benchmarks/out/ (git-ignored), else $FASTLORA_BENCH_OUT, else --out-dir; the committed results
    under benchmarks/results/ are untouched by a run that does not name them."""
    monkeypatch.delenv(common.OUT_ENV, raising=False)
    assert common.output_dir() == common.OUT_DIR != common.RESULTS_DIR
    assert common.RESULTS_DIR not in common.OUT_DIR.parents
    monkeypatch.setenv(common.OUT_ENV, str(tmp_path / "env"))
    assert common.output_dir() == tmp_path / "env"
    assert common.output_dir(str(tmp_path / "given")) == tmp_path / "given"      # the option wins
    monkeypatch.delenv(common.OUT_ENV)
    monkeypatch.setattr(common, "OUT_DIR", tmp_path / "default")                 # the default, redirected here
    before = {p: p.stat().st_mtime_ns for p in common.RESULTS_DIR.rglob("*")}
    assert traffic.main([]) == 0
    assert (tmp_path / "default" / "traffic_model.csv").exists()
    assert f"wrote {tmp_path / 'default' / 'traffic_model.csv'}" in capsys.readouterr().out     # says where
    committed = common.RESULTS_DIR / "paper_table_cpu_float32.csv"                # redraw a committed result
    assert plot.main([str(committed)]) == 0
    assert (tmp_path / "default" / "paper_table_cpu_float32.png").read_bytes()[:4] == b"\x89PNG"
    assert traffic.main(["--out-dir", str(tmp_path / "given")]) == 0
    assert (tmp_path / "given" / "traffic_model.csv").exists()
    assert {p: p.stat().st_mtime_ns for p in common.RESULTS_DIR.rglob("*")} == before


def test_host_overhead_dry_run(tmp_path, torch_backend, capsys):
    """python -m benchmarks.host_overhead: the three models compute the same layer (same weights), and a short
    run writes one row per (mode, dropout) with every provider's median."""
    from benchmarks import host_overhead
    ms = host_overhead.models(0.0)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        ys = {k: m.eval()(x) for k, m in ms.items()}
        lora = ys["peft"] - ms["peft"].base_model.model.q.base_layer(x)
    assert lora.abs().max() > 1e-2                                            # the LoRA term is really there
    torch.testing.assert_close(ys["fastlora"], ys["peft"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ys["module"], ys["peft"], rtol=1e-5, atol=1e-6)
    assert host_overhead.main(["--rounds", "2", "--out-dir", str(tmp_path)]) == 0
    rows = common.read_csv(tmp_path / "host_overhead_cpu.csv")
    assert [(r["mode"], r["dropout"]) for r in rows] == [("eval", "0.0"), ("train", "0.0"), ("eval", "0.1"),
                                                         ("train", "0.1")]
    assert all(float(r[k]) > 0 for r in rows for k in ("peft_us", "fastlora_us", "module_us", "ratio"))
    assert "LoraLinear" in capsys.readouterr().out


# ----------------------------------------------------------------------------- train step

TRAIN_TINY = ["--quick", "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "4", "--kv-heads",
              "2", "--vocab", "97", "--batch", "2", "--seq", "16", "--rounds", "2"]


def test_train_step_quick_dry_run(tmp_path, torch_backend, capsys):
    from benchmarks import train_step
    assert train_step.main(TRAIN_TINY + ["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "first-step loss" in out and "-> agree" in out and f"wrote {tmp_path}" in out
    (csv_path,) = tmp_path.glob("train_step_cpu_float32.csv")
    rows = {r["provider"]: r for r in common.read_csv(csv_path)}
    assert list(rows) == ["peft", "fastlora"] and rows["fastlora"]["patched_layers"] == "7"
    for r in rows.values():
        assert float(r["p20_tok_s"]) <= float(r["median_tok_s"]) <= float(r["p80_tok_s"]) and r["rounds"] == "2"
        assert r["peak_mib"] == "n/a" and float(r["saved_mib"]) > 0 and float(r["grad_rel_err"]) < 1e-4
        assert r["lora_dropout"] == "0.05" and r["r"] == "16" and r["adapter_dtype"] == "float32"
    assert rows["fastlora"]["speedup_lo"] != "" and float(rows["fastlora"]["speedup_vs_peft"]) > 0
    assert csv_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_train_step_check_catches_a_wrong_adapter(torch_backend):
    from benchmarks import train_step
    cfg = train_step.make_config(train_step.parser().parse_args(TRAIN_TINY))
    peft, fast, n, ref = train_step.make_pair(cfg)
    assert n == 7 * cfg.sizes.layers
    ids = train_step.batch(cfg, 0)
    train_step.check_agreement(peft, fast, ids, cfg)                          # same model: agrees
    with torch.no_grad():
        next(p for name, p in fast.named_parameters() if "lora_B" in name).mul_(1.5)
    with pytest.raises(RuntimeError, match="fastlora disagrees with PEFT"):
        train_step.check_agreement(peft, fast, ids, cfg)


def test_train_step_qlora_dry_run(tmp_path, torch_backend, capsys):
    """--qlora: both models load the same 4-bit weights, every LoRA layer is patched (fastlora.ops.qlora), and the
    first step agrees with the dequantized float64 reference."""
    pytest.importorskip("bitsandbytes")
    from benchmarks import train_step
    assert train_step.main(TRAIN_TINY + ["--qlora", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "-> agree" in out
    rows = {r["provider"]: r for r in common.read_csv(tmp_path / "train_step_cpu_float32_4bit.csv")}
    assert rows["fastlora"]["patched_layers"] == "7" and rows["fastlora"]["config"].endswith("4-bit")
    assert float(rows["fastlora"]["grad_rel_err"]) < 1e-4


@pytest.mark.parametrize("opts,msg", [(["--hidden", "30"], "divisible"), (["--rounds", "0"], "--rounds must be"),
                                      (["--dropout", "1.5"], "--dropout must be"), (["--layers", "0"], "--layers"),
                                      (["--device", "tpu"], "--device must be")])
def test_train_step_bad_options(opts, msg):
    from benchmarks import train_step
    with pytest.raises(ValueError, match=msg):
        train_step.make_config(train_step.parser().parse_args(["--quick", *opts]))


# ----------------------------------------------------------------------------- memory benchmark

def test_memory_benchmark_counts_saved_tensors(torch_backend):
    from benchmarks import memory
    rows = {(r["provider"], r["p"]): r for r in memory.measure(M=24, d=40, r=3)}
    x_sized = lambda prov, p: float(rows[(prov, p)]["extra_x_sized"])  # noqa: E731
    assert x_sized("base GEMM", 0.0) == 0.0
    # fastlora keeps S (M×r fp32) and 0-d scale/seed tensors beyond x and the parameters, never a
    # dropped copy of x or a byte mask (x is 24×40×4 = 3840 bytes); with dropout the torch backend (what
    # runs here) may keep the forward's mask bit-packed: 24×40 bits = 120 bytes
    assert 24 * 3 * 4 <= rows[("fastlora", 0.0)]["extra_bytes"] <= 24 * 3 * 4 + 64
    assert 24 * 3 * 4 <= rows[("fastlora", 0.1)]["extra_bytes"] <= 24 * 3 * 4 + 24 * 40 // 8 + 64
    assert x_sized("peft", 0.1) >= 1.0 and x_sized("loralib", 0.1) >= 1.0     # dropout(x) (+ mask)
    assert all(r["saved_bytes"] > 0 for r in rows.values())


def test_gpu_probe_writes_every_case_and_the_target_ratios(tmp_path, torch_backend, capsys):
    """Step 1 of the GPU day, at toy sizes on the CPU: every (mode, p, provider) row, no graph column on a CPU,
    and the ratio lines the targets are about."""
    from benchmarks import gpu_probe
    assert gpu_probe.main(["--device", "cpu", "--dims", "16", "24", "--tokens", "8", "--r", "4", "--dtype",
                           "float32", "--trials", "1", "--out-dir", str(tmp_path), "--suffix", "t"]) == 0
    rows = common.read_csv(tmp_path / "gpu_probe_cpu_t.csv")
    got = sorted((r["d"], r["mode"], r["p"], r["provider"]) for r in rows)
    want = sorted((d, m, p, prov) for d in ("16", "24") for m, p, prov in
                  [("fwd", "0.0", v) for v in ("base", "fastlora", "composite", "peft")]
                  + [("fwd+bwd", "0.0", v) for v in ("base", "fastlora", "peft")]
                  + [("fwd+bwd", "0.1", v) for v in ("fastlora", "peft")])
    assert got == want
    assert all(float(r["eager_ms"]) > 0 and r["graph_ms"] == "" for r in rows)
    out = capsys.readouterr().out
    assert "d 24 (eager): fwd fastlora/base" in out and "fwd+bwd p=0.1 fastlora/peft" in out


def test_tune_smoke_on_the_cpu_needs_the_interpreter(tmp_path, monkeypatch, capsys):
    import importlib
    tune = importlib.import_module("fastlora.tune")      # (the package's `tune` attribute is the function)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit):
        tune.main(["--device", "cpu", "--tokens", "16", "--dims", "32", "--ranks", "4"])
    assert "--device cpu needs TRITON_INTERPRET=1" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cache = tmp_path / "tune.json"
    assert tune.main(["--device", "cpu", "--tokens", "16", "--dims", "32", "--ranks", "4", "--dtype", "fp32",
                      "--cache", str(cache)]) == 0
    assert "wrote 4 entries" in capsys.readouterr().out and cache.is_file()
