"""DDP and FSDP2 (fully_shard) with fastlora modules, 2 processes on gloo (CPU): the LoRA
gradients equal the single-process gradients over the same global batch.

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

from fastlora.modules import LoraLinear, MergedLoraLinear

WORLD = 2


def build():
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


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * 3, 5, 16, generator=g), torch.randn(WORLD * 3, 5, 8, generator=g)


def lora_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            g = p.grad
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _run(mode, rank):
    model = build()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, (LoraLinear, MergedLoraLinear)):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        assert all(hasattr(p, "full_tensor") for p in model.parameters()), "parameters were not sharded"
    x, y = data()
    per = x.shape[0] // WORLD
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    nn.functional.mse_loss(wrapped(xs), ys).backward()
    grads = lora_grads(model)
    del wrapped, model        # DDP's reducer / FSDP's state go before the process group does
    gc.collect()
    return grads


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)                  # 2 processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for mode in ("ddp", "fsdp"):
            torch.save(_run(mode, rank), os.path.join(out_dir, f"{mode}{rank}.pt"))
        dist.barrier()            # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_lora_gradients_match_single_process(tmp_path):
    model = build()
    x, y = data()
    nn.functional.mse_loss(model(x), y).backward()
    want = lora_grads(model)
    assert len(want) == 6
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for mode in ("ddp", "fsdp"):
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{mode}{rank}.pt")
            assert got.keys() == want.keys()
            for n in want:
                # fp32 sums in another order (two half-batch means, averaged): a few ulps of the scale
                torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6,
                                           msg=f"{mode} rank {rank} {n}")
