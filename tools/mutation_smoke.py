#!/usr/bin/env python
"""Mutation smoke test: plausible one-line bugs that the test suite must catch.

Each mutant below is one small edit (exact old text -> new text) in one file, plus the narrow test
selection that must fail once it is applied. For every mutant the script edits a temporary copy of
the repository (never the working tree others edit), runs the selection there with pytest and reports
the mutant "killed" (the tests failed) or "survived" (they passed: a hole in the suite).

    python tools/mutation_smoke.py                  # every mutant, on a copy of the working tree
    python tools/mutation_smoke.py --rev HEAD       # on a committed revision instead (git archive)
    python tools/mutation_smoke.py --only det-atomic,split-n-ds-sum
    python tools/mutation_smoke.py --list           # the mutants and their test selections
    python tools/mutation_smoke.py --check          # only: is every old text present exactly once?

Exit status 0 when the unmutated selections pass and every mutant is killed; 1 on a survivor, on a
stale mutant (its old text is not in its file exactly once: the code moved, update the list with it)
or when the unmutated copy already fails its selections. tests/repo/test_mutation_smoke.py checks the list
(cheap, in every test run); the full run takes a few minutes on 2 cores and is documented in
docs/ARCHITECTURE.md.

How the copy is imported: the installed fastlora (pip install -e: the working tree) must not be what
runs, nor a mix (an editable install may map fastlora.kernels to the working tree's kernels/ with an
import hook, as this repository's did until pyproject's package-dir changed). The script writes a
sitecustomize.py (on PYTHONPATH, so the pytest process and any subprocess it starts load it) that puts
a finder first on sys.meta_path mapping every package pyproject lists to its folder in the copy
(package-dir rules, symlinks kept), and checks where fastlora and fastlora.kernels resolve before
running anything.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:      # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240          # per pytest run


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str                 # path from the repository root
    old: str                  # exact text, present exactly once in ``file``
    new: str
    tests: tuple[str, ...]    # pytest arguments: test files, then "-k", an expression
    bug: str                  # the bug, in words

    def selection(self) -> tuple[list[str], str]:
        args = list(self.tests)
        k = args.index("-k")
        return args[:k], args[k + 1]


T_DET = ("tests/ops/test_deterministic_launch.py", "-k", "test_deterministic_reaches_every_atomic_launch and 0.1-False")
T_DET_COMPILE = ("tests/ops/test_deterministic_launch.py", "-k", "test_compiled_training_step_keeps_deterministic and True")
T_DET_QLORA = ("tests/ops/test_deterministic_launch.py", "-k", "test_qlora_keeps_deterministic and eager")
T_DET_QLORA_COMPILE = ("tests/ops/test_deterministic_launch.py", "-k",
                       "test_qlora_keeps_deterministic and compile")
T_SPLIT = ("tests/ops/test_linear_grad.py", "-k", "test_split_n_dsdb_pass and 3-False")
T_DW = ("tests/ops/test_linear_grad.py", "-k", "test_trainable_base_weight_gradient and True-fp32-torch")
T_BWD_FIFO = ("tests/ops/test_linear_grad.py", "-k", "test_trainable_base_weight_gradient and True-fp32-triton")
T_MULTI_FIFO = ("tests/ops/test_multi_parity.py", "-k", "test_conv1d_base_grads and fp32-decode-triton")
T_MULTI_TORCH_FIFO = ("tests/ops/test_multi_parity.py", "-k", "test_conv1d_base_grads and fp32-decode-torch")
T_MULTI_DW = ("tests/ops/test_multi_parity.py", "-k",
              "test_trainable_base_weight_gradient_multi and fp32-drop-grouped-True-torch")
T_MULTI_FWD = ("tests/ops/test_multi_parity.py", "-k", "test_forward_parity and fp32-mixed-decode")
T_MULTI_P = ("tests/integrations/test_multi_peft.py", "-k", "test_per_adapter_dropout_matches_peft_adapter_by_adapter and triton")
T_MULTI_FROZEN = ("tests/integrations/test_multi_peft.py", "-k", "test_adamw_leaves_adapters_peft_froze_bitwise_unchanged and torch")
T_RSLORA_LOAD = ("tests/integrations/test_checkpoint.py", "-k", "test_rslora_peft_save_fastlora_load")
T_RSLORA_SAVE = ("tests/integrations/test_checkpoint.py", "-k", "test_rslora_fastlora_save_peft_load")
T_RSLORA_MIXED = ("tests/integrations/test_checkpoint.py", "-k", "test_save_refuses_mixed_rslora")
T_PARITY = ("tests/ops/test_linear_parity.py", "-k", "test_parity_sweep and fp32-r8-M33-K33N17-3d-bias-p0.1-triton")
T_MERGE = ("tests/nn/test_merge.py", "-k", "test_merge_is_w_plus_delta_rounded_once")
T_MOE = ("tests/ops/test_moe.py", "-k", "test_parity_with_oracle_and_peft_like_baseline and fp32-standard-torch")
T_MOE_TRITON = ("tests/ops/test_moe.py", "-k", "test_parity_with_oracle_and_peft_like_baseline and fp32-standard-triton")
T_MOE_MODEL = ("tests/integrations/test_moe_peft.py", "-k", "test_qwen3_moe_matches_peft_and_float64 and torch")
T_MOE_DROP = ("tests/ops/test_moe.py", "-k", "test_dropout_matches_the_oracle_with_the_same_mask and torch")
T_RECIPE = ("tests/ops/test_qlora.py", "-k", "test_recipe_layer_float32_x_into_half_compute and 0.0-compute0-torch")
T_INPLACE = ("tests/ops/test_outputs_inplace.py", "-k", "lora-3d-torch")
T_MHA = ("tests/integrations/test_patch_kinds.py", "-k", "test_multihead_attention_is_skipped")
T_TUNER = ("tests/integrations/test_patch_kinds.py", "-k", "test_lora_on_a_tuner_layer_is_not_served and loha")
T_WARN_ONCE = ("tests/integrations/test_trace.py", "-k", "test_mixed_batch_adapter_names_are_fallbacks")
T_PRECISION = ("tests/kernels/test_launch_choices.py", "-k", "test_each_launch_receives_its_precision_tier and bfloat16-float32")
T_SM_CAP = ("tests/kernels/test_launch_choices.py", "-k", "test_rule_caps_program_counts_at_the_sm_count")
T_REREAD = ("tests/kernels/test_launch_choices.py", "-k", "test_tune_cache_is_read_again_after_each_write")
T_TIE = ("tests/ops/test_dropout.py", "-k", "test_kernels_keep_the_element_whose_uniform_equals_p and single")
T_TORCH_MASK = ("tests/ops/test_dropout.py", "-k", "test_op_drops_exactly_its_backends_mask and torch")
T_PACKED = ("tests/ops/test_dropout.py", "-k", "test_packed_mask_round_trip and 0.1-13")

MUTANTS: tuple[Mutant, ...] = (
    # --- the five that survived the audit of issue 14 (each has its own test since) ---
    Mutant("det-compile", "fastlora/ops/lora.py",
           "    ctx.cfg = (dropout_p, fan_in_fan_out, deterministic, backend)\n",
           "    ctx.cfg = (dropout_p, fan_in_fan_out, False, backend)\n", T_DET_COMPILE,
           "deterministic=True dropped on the torch.compile path (the registered op's backward launches atomics)"),
    Mutant("det-compile-qlora", "fastlora/ops/qlora.py",
           "                                    torch.is_grad_enabled(), bool(deterministic), backend)\n",
           "                                    torch.is_grad_enabled(), False, backend)\n", T_DET_QLORA_COMPILE,
           "QLoRA under torch.compile drops deterministic=True (the traced LoRA op's backward launches atomics)"),
    Mutant("det-qlora", "fastlora/ops/qlora.py",
           "                                       (scale, p, seed_t, False, bool(deterministic), backend))\n",
           "                                       (scale, p, seed_t, False, False, backend))\n", T_DET_QLORA,
           "QLoRA's eager training drops deterministic=True (its backward launches atomics)"),
    Mutant("det-atomic", "kernels/linear_bwd.py",
           "    atomic = not deterministic\n", "    atomic = True\n", T_DET,
           "deterministic=True never reaches the kernels (atomics always on)"),
    Mutant("multi-bwd-fifo", "kernels/multi_lora.py",
           "    w = weight_nk(weight, fan_in_fan_out).to(dy2.dtype)\n",
           "    w = weight.to(dy2.dtype)\n", T_MULTI_FIFO,
           "multi-adapter backward (Triton) loses the Conv1D (fan_in_fan_out) transpose"),
    Mutant("multi-torch-bwd-fifo", "fastlora/ops/multi_reference.py",
           "    w = weight_nk(weight, fan_in_fan_out)\n    ks = _keep_scale(seed, x2.shape[0], K, plan,",
           "    w = weight\n    ks = _keep_scale(seed, x2.shape[0], K, plan,", T_MULTI_TORCH_FIFO,
           "multi-adapter backward (torch path) loses the Conv1D (fan_in_fan_out) transpose"),
    Mutant("dW-single", "fastlora/ops/lora.py",
           "    dW = weight_grad(dy, x, fan_in_fan_out, weight.dtype) if needs_dW else None\n    return dx, dA, dB, dbias, dW\n\n\ndef _op_forward(",
           "    dW = 2 * weight_grad(dy, x, False, weight.dtype) if needs_dW else None\n    return dx, dA, dB, dbias, dW\n\n\ndef _op_forward(", T_DW,
           "gradient of a trainable W0 doubled and never transposed (single adapter)"),
    Mutant("dW-multi", "fastlora/ops/multi.py",
           "    dW = weight_grad(dy, x, fan_in_fan_out, weight.dtype) if needs_dW else None\n",
           "    dW = 2 * weight_grad(dy, x, False, weight.dtype) if needs_dW else None\n", T_MULTI_DW,
           "gradient of a trainable W0 doubled and never transposed (multi-adapter)"),
    Mutant("dW-rule", "fastlora/core/checks.py",
           "    return weight_nk(g, fan_in_fan_out).to(dtype)\n", "    return g.to(dtype)\n", T_DW,
           "the shared trainable-W0 gradient never transposed back to a Conv1D weight's (K, N) layout"),
    Mutant("rslora-load", "fastlora/integrations/checkpoint.py",
           "new.scaling = alpha / (new.r ** 0.5) if rslora else alpha / new.r",
           "new.scaling = alpha / new.r", T_RSLORA_LOAD,
           "load_peft_adapter scales rsLoRA adapters by alpha/r instead of alpha/sqrt(r)"),
    Mutant("rslora-save", "fastlora/integrations/checkpoint.py",
           '"use_rslora": next(iter(layers.values())).use_rslora,', '"use_rslora": False,', T_RSLORA_SAVE,
           "save_peft_adapter writes use_rslora=False for rsLoRA modules"),
    Mutant("rslora-mixed", "fastlora/integrations/checkpoint.py",
           "    if len({m.use_rslora for m in layers.values()}) > 1:\n", "    if False:\n", T_RSLORA_MIXED,
           "save_peft_adapter silently saves modules that mix use_rslora True and False"),
    Mutant("split-n-ds-sum", "kernels/linear_bwd.py",
           "    ds = ds_part[0] if split == 1 else ds_part.sum(0)\n", "    ds = ds_part[0]\n", T_SPLIT,
           "split-N dS/dB pass: the partial dS sums over the column splits are dropped"),
    # --- five the audit found caught; kept so that they stay caught ---
    Mutant("dA-dropout-scale", "kernels/linear_bwd.py",
           "tl.atomic_add(da_ptrs, da * inv_keep,", "tl.atomic_add(da_ptrs, da,", T_PARITY,
           "dA loses the 1/(1-p) dropout scale"),
    Mutant("dB-scale", "kernels/linear_bwd.py",
           "tl.atomic_add(db_ptrs, db * scale,", "tl.atomic_add(db_ptrs, db,", T_PARITY,
           "dB loses the scaling s"),
    Mutant("bwd-fifo", "kernels/linear_bwd.py",
           "    w = weight_nk(weight, fan_in_fan_out)\n", "    w = weight\n", T_BWD_FIFO,
           "backward ignores fan_in_fan_out (Conv1D weight read as (N, K))"),
    Mutant("multi-offsets", "kernels/multi_lora.py",
           "    off = tl.load(off_ptr + k_safe)\n", "    off = tl.load(off_ptr + k_safe) + 1\n", T_MULTI_FWD,
           "multi-adapter packed-bank offsets off by one"),
    Mutant("multi-unset-read", "kernels/_tiles.py",
           "* stride_sr, mask=m_ok[:, None] & j_ok[None, :], other=0.0)\n",
           "* stride_sr, mask=m_ok[:, None], other=0.0)\n", T_MULTI_FWD,
           "the shared expand tile reads S past the token's rank (unset memory on a GPU)"),
    Mutant("multi-dropout-p", "kernels/multi_lora.py",
           "    return tl.load(seed_ptr), tl.load(p_ptr + 2 * k), tl.load(p_ptr + 2 * k + 1)\n",
           "    return tl.load(seed_ptr), tl.load(p_ptr), tl.load(p_ptr + 1)\n", T_MULTI_P,
           "multi-adapter kernels apply adapter 0's dropout p to every adapter"),
    Mutant("multi-frozen-trains", "fastlora/ops/bank.py",
           "            bank.lora_A_params[n].requires_grad_(A.requires_grad)\n",
           "            bank.lora_A_params[n].requires_grad_(True)\n", T_MULTI_FROZEN,
           "a bank built from a PEFT layer trains the lora_A of adapters PEFT froze"),
    Mutant("merge-precision", "fastlora/nn/lora.py",
           "        hi = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32\n"
           "        delta = self.delta_weight(hi)\n",
           "        hi = w.dtype\n        delta = self.delta_weight(hi)\n", T_MERGE,
           "merge forms s·B·A and W0 + ΔW in W0's precision (rounded twice)"),
    # --- LoRA on MoE experts (issue 22) ---
    Mutant("moe-B-layout", "fastlora/ops/moe.py",
           "    return lora_B.reshape(out, er // num_experts, num_experts).transpose(1, 2).reshape(out, er)\n",
           "    return lora_B.reshape(out, er)\n", T_MOE,
           "PEFT's rank-major expert B (column j·E + e) read as expert-major (the B-layout trap)"),
    Mutant("moe-router-grad", "fastlora/ops/moe.py",
           "    weighted = y * w[:, None]", "    weighted = y * w.detach()[:, None]", T_MOE_MODEL,
           "the routing weights lose their gradient (the router and earlier layers stop learning from the experts)"),
    Mutant("moe-accumulate", "fastlora/ops/moe.py",
           "              dropout=False, accumulate=True)\n    return y, (Sv",
           "              dropout=False, accumulate=False)\n    return y, (Sv", T_MOE_TRITON,
           "the expand kernel overwrites the grouped GEMM's output instead of adding the LoRA term onto it"),
    Mutant("moe-dropout-seed", "fastlora/ops/moe.py",
           "None if seed is None else int(seed) + 1", "seed", T_MOE_DROP,
           "down_proj's dropout reuses gate_up's seed (correlated masks, not the documented draw)"),
    # --- issue 19: what runs is what the user is told ---
    Mutant("qlora-recipe-rounds-x", "fastlora/ops/qlora.py",
           "    if recipe(x, cd, lora_A):", "    if False:", T_RECIPE,
           "the QLoRA recipe's float32 x is rounded to the compute dtype for the LoRA branch too (and kept)"),
    Mutant("output-view", "fastlora/ops/lora.py",
           "    return y if y._base is None else y.detach()\n", "    return y\n", T_INPLACE,
           "the autograd Function returns a view: in-place ops on the output fail in training"),
    Mutant("fingerprint-by-id", "fastlora/integrations/patching.py",
           "    return {k: (v.data_ptr(), tuple(v.shape),", "    return {k: (id(v), tuple(v.shape),", T_MHA,
           "patch's integrity check compares Python ids: PEFT's MultiheadAttention makes it undo every patch"),
    Mutant("tuner-base-served", "fastlora/integrations/patching.py",
           "        why = tuner_base_reason(m)\n", "        why = None\n", T_TUNER,
           "LoRA on a LoHa / LoKr layer computed from the innermost weight (the inner adapter dropped)"),
    Mutant("fallback-warns-every-call", "fastlora/core/tracing.py",
           "    warned.add(reason)\n", "    pass\n", T_WARN_ONCE,
           "a fall-back warns on every call instead of once per layer and reason"),
    # --- four more survivors of the issue-21 audit, each with its own test since ---
    Mutant("x3-shrink", "kernels/linear_fwd.py",
           "shrink(x2, lora_A, S, seed, p, policy.lora_precision(x.dtype, lora_A.dtype) if save_s else prec)",
           "shrink(x2, lora_A, S, seed, p, prec)", T_PRECISION,
           "the S-saving shrink gets the plain precision instead of tf32x3 (fp32 adapters on a half base)"),
    Mutant("sm-cap", "kernels/policy.py",
           "    return max(cands, key=lambda c: (min(_programs(kernel, c, M, width, R), sms), -cands.index(c)))\n",
           "    return max(cands, key=lambda c: (_programs(kernel, c, M, width, R), -cands.index(c)))\n", T_SM_CAP,
           "the tile rule no longer caps program counts at the SM count"),
    Mutant("tune-reread", "kernels/policy.py",
           "    os.replace(tmp, path)\n    reset()\n", "    os.replace(tmp, path)\n", T_REREAD,
           "launches keep the tune cache read before a write (the new entries never launch)"),
    Mutant("keep-tie", "kernels/_common.py",
           "    return u >= p\n", "    return u > p\n", T_TIE,
           "the kernels' dropout drops the element whose uniform equals p exactly (u > p keeps)"),
    # --- the CPU torch path's own mask (issue 20) ---
    Mutant("torch-dx-mask", "fastlora/ops/lora.py",
           "        if dropout_p > 0:\n            lora_dx.mul_(keep)\n", "", T_TORCH_MASK,
           "CPU torch backward forgets the dropout mask on dx's LoRA term"),
    Mutant("packed-bit-order", "fastlora/core/dropout.py",
           'np.packbits(u.numpy() >= np.float32(p), axis=-1, bitorder="little")',
           'np.packbits(u.numpy() >= np.float32(p), axis=-1, bitorder="big")', T_PACKED,
           "the bit-packed mask kept for backward is packed in the wrong bit order (backward sees another mask)"),
)


# ---------------------------------------------------------------------------
# checks on the list
# ---------------------------------------------------------------------------

def problems(root: Path = REPO, mutants=MUTANTS) -> list[str]:
    """What is wrong with the list against the tree at ``root``: [] when every mutant is well-formed and
    its old text is in its file exactly once."""
    out = []
    ids = [m.id for m in mutants]
    out += [f"duplicate mutant id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for m in mutants:
        path = root / m.file
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", m.id):
            out.append(f"{m.id!r}: ids are words joined by '-'")
        if m.old == m.new or not m.old:
            out.append(f"{m.id}: old and new text must differ and old must not be empty")
        if "-k" not in m.tests or not m.tests[-1] or m.tests.index("-k") != len(m.tests) - 2:
            out.append(f"{m.id}: tests must be (test files..., '-k', expression), got {m.tests}")
        else:
            for f in m.selection()[0]:
                if not (root / f).is_file():
                    out.append(f"{m.id}: test file {f} does not exist")
        if not path.is_file():
            out.append(f"{m.id}: {m.file} does not exist (stale mutant: update the list)")
            continue
        n = path.read_text().count(m.old)
        if n != 1:
            out.append(f"{m.id}: old text found {n} times in {m.file}, expected once "
                       f"(stale mutant: update the list): {m.old!r}")
    return out


# ---------------------------------------------------------------------------
# the copy
# ---------------------------------------------------------------------------

def copy_tree(dest: Path, rev: str | None) -> None:
    """The repository's files into ``dest``: a committed revision, or the working tree's tracked and
    untracked-but-not-ignored files as they are now."""
    if rev is not None:
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:                    # Pythons without extraction filters; the archive is our own repository's
                tar.extractall(dest)
        return
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, names):
        src, dst = REPO / name, dest / name
        if src.is_symlink():         # e.g. src/fastlora -> ../fastlora: keep the link, relative to the copy
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst)
        elif src.is_file():          # (tracked but deleted in the working tree: skipped)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


SITECUSTOMIZE = '''\
# written by tools/mutation_smoke.py: import the packages of pyproject's package-dir from the copy
import importlib.machinery
import importlib.util
import os
import sys

_MAP = {mapping!r}


class _CopyFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        d = _MAP.get(name)
        if d is None:
            return None
        if os.path.isfile(d + "/__init__.py"):
            return importlib.util.spec_from_file_location(name, d + "/__init__.py", submodule_search_locations=[d])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)   # a plain folder (kernels/)
        spec.submodule_search_locations = [d]
        return spec


sys.meta_path.insert(0, _CopyFinder)
'''


def package_path(pkg: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes package ``pkg`` from: the longest listed prefix ("" = the root) + the rest."""
    parts = pkg.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return Path(package_dir[prefix], *parts[i:])
    return Path(*parts)


def write_boot(copy: Path, boot: Path) -> dict[str, str]:
    """sitecustomize.py in ``boot`` mapping every package pyproject lists to its folder in the copy."""
    setup = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setup.get("package-dir", {})
    mapping = {pkg: str(copy / package_path(pkg, package_dir)) for pkg in setup["packages"]}
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE.format(mapping=mapping))
    return mapping


def child_env(boot: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTLORA_", "TRITON_", "PYTEST_")) and k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(PYTHONPATH=str(boot), PYTHONDONTWRITEBYTECODE="1", CI="true", TRITON_DEFAULT_FP_FUSION="1")
    return env


def check_resolution(copy: Path, env: dict, mapping: dict[str, str]) -> str | None:
    """None when every mapped package (and fastlora.kernels' modules) is imported from the copy."""
    code = ("import importlib, json, sys\n"
            f"names = {sorted(mapping)!r}\n"
            "mods = {n: importlib.import_module(n) for n in names}\n"
            "mods = {n: m.__file__ or list(m.__path__)[0] for n, m in mods.items()}\n"
            "import fastlora.kernels.linear_bwd as b\n"
            "mods['fastlora.kernels.linear_bwd'] = b.__file__\n"
            "print(json.dumps(mods))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    if r.returncode != 0:
        return f"importing fastlora from the copy failed:\n{r.stderr[-3000:]}"
    import json
    wrong = {n: f for n, f in json.loads(r.stdout.strip().splitlines()[-1]).items()
             if not Path(f).resolve().is_relative_to(copy.resolve())}
    return f"these modules resolve outside the copy {copy}: {wrong}" if wrong else None


def run_pytest(copy: Path, env: dict, files: list[str], k: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-rN",
           *files, "-k", k]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n(timed out after {TIMEOUT_S} s)", time.perf_counter() - t0
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0


def summary(output: str) -> str:
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="test this git revision (git archive) instead of the working tree")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check the list against the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.id for m in MUTANTS})
        if unknown:
            ap.error(f"--only: unknown mutant ids {unknown}; known: {[m.id for m in MUTANTS]}")
        mutants = tuple(m for m in MUTANTS if m.id in wanted)
    if args.list:
        for m in mutants:
            print(f"{m.id:22s} {m.file:24s} {' '.join(m.tests)}\n{'':22s} {m.bug}")
        return 0
    if args.check:
        bad = problems(REPO, mutants)
        print("\n".join(bad) or f"{len(mutants)} mutants: well-formed, old texts present once")
        return 1 if bad else 0

    tmp = Path(tempfile.mkdtemp(prefix="fastlora-mutants-"))
    copy, boot = tmp / "repo", tmp / "boot"
    try:
        copy.mkdir()
        copy_tree(copy, args.rev)
        mapping = write_boot(copy, boot)
        env = child_env(boot)
        print(f"copy of {'revision ' + args.rev if args.rev else 'the working tree'}: {copy}", flush=True)
        err = check_resolution(copy, env, mapping)
        if err:
            print(f"ERROR: {err}")
            return 1
        stale = problems(copy, mutants)
        for line in stale:
            print(f"STALE  {line}")
        live = [m for m in mutants if not any(line.startswith(f"{m.id}:") for line in stale)]

        # the unmutated copy must pass every selection (else a "kill" would prove nothing)
        files = sorted({f for m in live for f in m.selection()[0]})
        k_all = " or ".join(sorted({f"({m.selection()[1]})" for m in live}))
        rc, out, secs = run_pytest(copy, env, files, k_all)
        print(f"{'baseline':9s} {'(unmutated)':22s} {secs:6.1f} s  {summary(out)}", flush=True)
        if rc != 0:
            print(out[-4000:])
            print("ERROR: the unmutated copy fails the selected tests; fix that first")
            return 1

        survivors, errors = [], []
        for m in live:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, out, secs = run_pytest(copy, env, *m.selection())
            finally:
                path.write_text(original)
            if rc == 0:
                verdict = "SURVIVED"
                survivors.append(m.id)
            elif rc in (1, 2, -1):       # tests failed / collection error (e.g. import) / timed out
                verdict = "killed"
            else:                        # 3 internal error, 4 usage error, 5 nothing selected: the list is wrong
                verdict = "ERROR"
                errors.append(m.id)
            print(f"{verdict:9s} {m.id:22s} {secs:6.1f} s  {summary(out)}", flush=True)
            if verdict != "killed":
                print(f"          {m.file}: {m.bug}; tests: {' '.join(m.tests)}")
        print(f"\n{len(live) - len(survivors) - len(errors)}/{len(live)} killed, {len(survivors)} survived "
              f"{survivors or ''}, {len(errors)} errors {errors or ''}, {len(stale)} stale")
        return 1 if survivors or errors or stale else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
