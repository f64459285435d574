"""The README runs as written, from the repository root, as a CPU user runs it (issue 18).

* Every ```python block of README.md and docs/usage.md runs, on the pure-torch backend (what a CPU user without
  TRITON_INTERPRET gets), with tiny random models standing in for the names a block leaves to the reader
  (``model``, ``batch``, ``x``, ...; CONTEXTS below: one entry per block, found by a line of the block). A new or
  changed block without a context fails here: give it one, so every snippet stays runnable; a context whose block
  is gone fails too.
* Every documented ``python -m benchmarks.X`` and ``python -m fastlora.tune`` answers ``--help`` in ONE process
  started in the repository root (the import path users have: the root first on sys.path).
* No README line installs ``fastlora`` from the package index (the index's fastlora is another project).
The main job (``python -m benchmarks.paper_table --quick``), ``train_step --quick`` and ``run_gpu.sh --dry-run``
run in CI from the root of the fresh venv's clone (.ci/run): minutes, too long for the suite.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# the README's snippets, then those of the usage guide it links to for DoRA, QLoRA and MoE experts
DOCS_WITH_SNIPPETS = ("README.md", "docs/usage.md")
SOURCES = [(doc, block) for doc in DOCS_WITH_SNIPPETS
           for block in re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)]
BLOCKS = [block for _, block in SOURCES]
VOCAB = 128


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64))


def ids(batch=2, seq=8):
    return torch.randint(0, VOCAB, (batch, seq))


def quickstart(tmp):
    return dict(model=tiny_llama(), batch=ids())


def functional(tmp):
    K, N, r = 32, 24, 4
    return dict(x=torch.randn(2, 5, K, requires_grad=True), weight=torch.randn(N, K), bias=torch.randn(N),
                lora_A=torch.randn(r, K, requires_grad=True), lora_B=torch.randn(N, r, requires_grad=True),
                alpha=8, r=r)


def modules(tmp):
    gpt2 = tiny_gpt2()
    return dict(model=tiny_gpt2(), gpt2_block=gpt2.transformer.h[0], plain_hf_model=gpt2)


def dora(tmp):
    return dict(model=tiny_llama())


def qlora(tmp):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    tiny_llama().save_pretrained(tmp / "tiny-llama")
    lin = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")  # quantizes on .to()
    return dict(path=str(tmp / "tiny-llama"), bnb_linear4bit=lin)


def multi(tmp):
    import copy

    from peft import LoraConfig, get_peft_model
    K, N = 32, 24
    base = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="math")
    peft_model.add_adapter("code", cfg)
    return dict(in_features=K, out_features=N, A1=torch.randn(4, K), B1=torch.randn(N, 4), A2=torch.randn(8, K),
                B2=torch.randn(N, 8), base_linear=nn.Linear(K, N), x=torch.randn(2, 5, K),
                adapter_ids=torch.tensor([0, 1]), peft_model=peft_model, input_ids=ids(3, 6), dev="cpu")


def moe(tmp):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    def tiny_moe():
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64))
    return dict(moe_model=tiny_moe(), other_moe_model=tiny_moe())


def traced(tmp):
    import fastlora
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    fastlora.patch(model)
    return dict(model=model, batch=ids())


# (a line that identifies the block, the context that block runs in)
CONTEXTS = [
    ('print(fastlora.patch(model))        # which LoRA layers', quickstart),
    ("y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B", functional),
    ('fastlora.load_peft_adapter(plain_hf_model, "out")', modules),
    ("use_dora=True", dora),
    ("BitsAndBytesConfig(", qlora),
    ("mm = MultiAdapterModel(peft_model)", multi),
    ('target_parameters=["mlp.experts.gate_up_proj"', moe),
    ("with fastlora.trace() as t:", traced),
]


def context_of(block: str):
    found = [make for key, make in CONTEXTS if key in block]
    assert len(found) == 1, (f"README / usage block without exactly one context in tests/repo/test_readme.py "
                             f"({len(found)} found); its first lines:\n{block[:300]}")
    return found[0]


@pytest.fixture
def torch_backend(monkeypatch):
    """What a CPU user gets: no TRITON_INTERPRET, so fastlora's pure-torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)


def test_every_block_has_a_context():
    used = [context_of(block) for block in BLOCKS]
    unused = [key for key, make in CONTEXTS if make not in used]
    assert unused == [], f"README / docs/usage.md lost the python blocks of these contexts: {unused}"


@pytest.mark.usefixtures("torch_backend", "one_thread")
@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=lambda i: BLOCKS[i].strip().splitlines()[-1][:40])
def test_readme_block_runs(i, tmp_path, monkeypatch):
    import warnings
    monkeypatch.chdir(tmp_path)                  # blocks save checkpoints ("adapter", "out") in the current folder
    torch.manual_seed(0)
    ns = context_of(BLOCKS[i])(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")      # autocast("cuda") on a CPU
        exec(compile(BLOCKS[i], f"{SOURCES[i][0]} block {i}", "exec"), ns)


# ---------------------------------------------------------------------------- documented commands

def documented_modules() -> list[str]:
    texts = [README] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    found = set()
    for text in texts:
        found |= set(re.findall(r"python3? -m ((?:benchmarks|fastlora)\.\w+)", text))
    return sorted(found)


def test_documented_commands_answer_help_from_the_repo_root():
    mods = documented_modules()
    assert {"benchmarks.paper_table", "benchmarks.train_step", "fastlora.tune"} <= set(mods), mods
    code = ("import contextlib, io, runpy, sys\nbad = {}\n"
            f"for mod in {mods!r}:\n"
            "    sys.argv = [mod, '--help']\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "            runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
            "        bad[mod] = 'returned without printing help and exiting'\n"
            "    except SystemExit as e:\n"
            "        if e.code not in (0, None) or 'usage' not in out.getvalue():\n"
            "            bad[mod] = f'exit {e.code}: {out.getvalue()[-300:]}'\n"
            "    except BaseException as e:\n"
            "        bad[mod] = repr(e)[-500:]\n"
            "print('BAD', bad)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "FASTLORA_"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "BAD {}", out.stdout[-3000:]


def test_no_readme_line_installs_fastlora_from_the_index():
    bad = re.compile(r"pip install [^\n`]*?(?<![\w./-])[\"']?fastlora(\[[\w,]+\])?[\"']?(?![\w/.-])")
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = [ln for ln in doc.read_text().splitlines() if bad.search(ln)]
        assert lines == [], f"{doc.name} installs `fastlora` from the package index (another project): {lines}"
