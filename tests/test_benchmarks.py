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
from benchmarks import common, paper_table, plot, tile_sweep, traffic
# Imported here, at collection, while conftest's TRITON_INTERPRET=1 holds: Triton fixes a kernel's mode when
# its module is imported, and the torch_backend fixture below sets TRITON_INTERPRET=0 for model-level tests.
from fastlora.kernels import linear_bwd, linear_fwd

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
    from fastlora.patching import is_patched
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
    made = paper_table.multi_adapter_row(base, cfg, "16x256")     # raises if it disagrees with PEFT
    if made is None:
        pytest.skip("fastlora.multi has not landed")
    model, params, _ = made
    assert params == 16 * cfg.n_layer * paper_table.LORA_R * 4 * cfg.n_embd
    assert model.names == [f"a{i}" for i in range(16)]


def test_multi_adapter_row_half_precision_uses_the_idiom(torch_backend):
    """In float16 the row is checked against a float32 run of the PEFT model (2x PEFT's own error)."""
    cfg = tiny_cfg(dtype=torch.float16)
    made = paper_table.multi_adapter_row(paper_table.build_base(cfg), cfg, "16x256")
    assert made is not None and made[1] == 16 * cfg.n_layer * paper_table.LORA_R * 4 * cfg.n_embd


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
    rc = paper_table.main(TINY + ["--trials", "2", "--warmup", "0", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "--columns all" in out and "bottleneck r = 3" in out
    (csv_path,) = tmp_path.glob("paper_table_cpu_float32.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == paper_table.CSV_COLUMNS
        rows = list(reader)
    expected = set(paper_table.ROWS)
    assert expected <= {r["row"] for r in rows}
    for r in rows:
        assert float(r["mean_ms"]) > 0 and float(r["std_ms"]) >= 0 and float(r["median_ms"]) > 0
        assert r["column"] == "1x128" and r["trials"] == "2" and r["dtype"] == "float32"
        assert "torch=" in r["versions"] and "fastlora=" in r["versions"] and r["device"]
        dt.datetime.fromisoformat(r["timestamp"])
    merged = next(r for r in rows if r["row"] == "merged")
    assert float(merged["overhead_pct"]) == 0.0 and merged["paper_mean_ms"] == "19.8"
    ad_h = next(r for r in rows if r["row"] == "AdapterH")
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
    assert cfg.columns == ["1x128"] and cfg.trials == 10 and cfg.dtype == torch.float32 and cfg.notes
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
        for k, t in tot.items():
            assert t["bytes"] > 0 and t["flops"] > 0 and t["model_time_us"] > 0 and t["launches"] >= 1, k
        base = tot[("fwd", "base GEMM")]
        for impl in ("PEFT", "torch composite", "fastlora 1-launch", "fastlora 2-launch"):
            assert tot[("fwd", impl)]["bytes"] >= base["bytes"]          # nothing beats the base GEMM
            assert tot[("fwd", impl)]["flops"] >= base["flops"]
        one, two = tot[("fwd", "fastlora 1-launch")], tot[("fwd", "fastlora 2-launch")]
        assert one["bytes"] < two["bytes"] < tot[("fwd", "torch composite")]["bytes"] < tot[("fwd", "PEFT")]["bytes"]
        assert one["flops"] >= two["flops"]                              # the shrink recomputed per N tile
        assert one["launches"] == 1 and two["launches"] == 2
        assert tot[("bwd", "fastlora")]["bytes"] < tot[("bwd", "PEFT")]["bytes"]
        # one-launch traffic = base GEMM + adapters (+ S saved when training): no extra x-sized traffic
        extra = one["bytes"] - base["bytes"]
        assert extra <= (s.r * s.K + s.N * s.r) * s.ba + s.M * s.r * 4
    padded, wp = traffic.multi_adapter(256, 128, 128, [4, 8, 64])
    packed, wk = traffic.multi_adapter(256, 128, 128, [4, 8, 64], packed=True)
    padded, wp = traffic.multi_adapter(256, 128, 128, [4, 8, 64], packed=False)
    assert wk < wp and sum(k.flops for k in packed) < sum(k.flops for k in padded)
    rows = traffic.model_rows()
    assert {r["label"] for r in rows} == {"model"} and {r["gpu"] for r in rows} == set(traffic.GPUS)
    path = common.write_csv(tmp_path / "t.csv", traffic.CSV_COLUMNS, rows)
    assert plot.plot_csv(path).exists()


def test_traffic_model_roofline_formula():
    k = [traffic.Kernel("a", 3.35e6, 1.0), traffic.Kernel("b", 1.0, 989.4e6)]   # 1 µs memory, 1 µs compute
    t = traffic.totals(k, "H100 SXM")
    assert t["model_time_us"] == pytest.approx(2.0 + 2 * traffic.LAUNCH_US)
    assert traffic.Shape(1, 1, 1, 3).rp == 16 and traffic.Shape(1, 1, 1, 17).rp == 32


# ----------------------------------------------------------------------------- memory benchmark

def test_memory_benchmark_counts_saved_tensors(torch_backend):
    from benchmarks import memory
    rows = {(r["provider"], r["p"]): r for r in memory.measure(M=24, d=40, r=3)}
    x_sized = lambda prov, p: float(rows[(prov, p)]["extra_x_sized"])  # noqa: E731
    assert x_sized("base GEMM", 0.0) == 0.0
    # fastlora keeps S (M×r fp32) and 0-d scale/seed tensors beyond x and the parameters, never a
    # dropped copy of x or a mask (x is 24×40×4 = 3840 bytes)
    assert 24 * 3 * 4 <= rows[("fastlora", 0.1)]["extra_bytes"] <= 24 * 3 * 4 + 64
    assert x_sized("peft", 0.1) >= 1.0 and x_sized("loralib", 0.1) >= 1.0     # dropout(x) (+ mask)
    assert all(r["saved_bytes"] > 0 for r in rows.values())


def test_tile_sweep_runs_every_candidate_and_checks_it():
    """The GPU tile sweep's machinery at toy size in the interpreter: each candidate config really runs (the
    autotuner restricted to it), its result is checked against float64, and the kernels get their lists back."""
    before = (list(linear_fwd._gemm.configs), list(linear_bwd._dx.configs))
    rows = tile_sweep.sweep(d=40, M=20, r=4, device=torch.device("cpu"), dtype=torch.float32)
    n_fwd, n_dx = len(tile_sweep.fwd_candidates()), len(tile_sweep.dx_candidates())
    assert [r["kernel"] for r in rows] == ["fwd"] * n_fwd + ["dx p=0.0"] * n_dx + ["dx p=0.1"] * n_dx
    assert all(r["error"] == "" for r in rows), [r["error"] for r in rows]
    assert len({r["config"] for r in rows if r["kernel"] == "fwd"}) == n_fwd
    assert (list(linear_fwd._gemm.configs), list(linear_bwd._dx.configs)) == before


@pytest.mark.parametrize("args,match", [(["--d", "0"], "--d must be >= 1"), (["--r", "-1"], "--r must be >= 1"),
                                        (["--tokens", "0"], "--tokens must be >= 1")])
def test_tile_sweep_rejects_bad_sizes(args, match, capsys):
    with pytest.raises(SystemExit):
        tile_sweep.main(args)
    assert match in capsys.readouterr().err
