"""DDP and FSDP2 (fully_shard), 2 processes on gloo (CPU), with fastlora's modules and with a PEFT model
patched by fastlora.patch (the fused op serving every LoRA layer, counted): the LoRA gradients equal the
single-process gradients over the same global batch.

Each rank takes half of the batch; the loss is a per-rank mean, so DDP's / FSDP2's gradient
averaging gives the gradient of the global-batch mean, which one process computes directly.
LoRA dropout is 0 here: with p > 0 each rank draws its own seed, so the masks (not the maths)
would differ from the single-process run.
"""
import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastlora.integrations.patching as fp
import fastlora.integrations.peft_layers as fpl
from fastlora.nn.lora import LoraLinear, MergedLoraLinear

WORLD = 2


def build(kind="fastlora"):
    if kind == "peft":
        return patched_peft()
    torch.manual_seed(0)
    model = nn.Sequential(
        MergedLoraLinear(16, 48, 2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True,
                         merge_weights=False),
        nn.Tanh(),
        LoraLinear(48, 24, 4, lora_alpha=8, merge_weights=False),
        nn.Tanh(),
        LoraLinear(24, 8, 2, lora_alpha=2, merge_weights=False),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.3)
    return model


def patched_peft():
    """A PEFT model (LoRA on nn.Linear, GPT-2 Conv1D, nn.Linear) with every LoRA layer patched. Built here,
    not imported from another test module: the spawned ranks cannot import the `tests` package."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), Conv1D(32, 40), nn.Tanh(), nn.Linear(32, 16, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PEFT: "fan_in_fan_out set to True for Conv1D"
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.3)
    assert len(fp.patch(model).patched) == 3
    return model


def data(kind="fastlora"):
    g = torch.Generator().manual_seed(1)
    k, n = (24, 16) if kind == "peft" else (16, 8)
    return torch.randn(WORLD * 3, 5, k, generator=g), torch.randn(WORLD * 3, 5, n, generator=g)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, (LoraLinear, MergedLoraLinear)) or fp.is_patched(m)]


def lora_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            g = p.grad
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _run(kind, mode, rank):
    model = build(kind)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in lora_layers(model):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        assert all(hasattr(p, "full_tensor") for p in model.parameters()), "parameters were not sharded"
    x, y = data(kind)
    per = x.shape[0] // WORLD
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    calls, real = [], fpl._lora_linear
    fpl._lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        nn.functional.mse_loss(wrapped(xs), ys).backward()
    finally:
        fpl._lora_linear = real
    grads = lora_grads(model)
    grads["fused calls"] = torch.tensor(len(calls))
    del wrapped, model        # DDP's reducer / FSDP's state go before the process group does
    gc.collect()
    return grads


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)                  # 2 processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for kind in ("fastlora", "peft"):
            for mode in ("ddp", "fsdp"):
                torch.save(_run(kind, mode, rank), os.path.join(out_dir, f"{kind}-{mode}{rank}.pt"))
        dist.barrier()            # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_lora_gradients_match_single_process(tmp_path):
    wants = {}
    for kind in ("fastlora", "peft"):
        model = build(kind)
        x, y = data(kind)
        nn.functional.mse_loss(model(x), y).backward()
        wants[kind] = lora_grads(model)
        assert len(wants[kind]) == 6
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for kind, want in wants.items():
        for mode in ("ddp", "fsdp"):
            for rank in range(WORLD):
                got = torch.load(tmp_path / f"{kind}-{mode}{rank}.pt")
                calls = int(got.pop("fused calls"))
                if kind == "peft":              # the patched layers ran fastlora's op, not PEFT's forward
                    assert calls == 3, f"{mode} rank {rank}: {calls} fused calls for 3 patched layers"
                assert got.keys() == want.keys()
                for n in want:
                    # fp32 sums in another order (two half-batch means, averaged): a few ulps of the scale
                    torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6,
                                               msg=f"{kind} {mode} rank {rank} {n}")
