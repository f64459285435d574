"""Make a PEFT / loralib model draw fastlora's dropout masks, so both sides of a parity test see the same
masks: ReplayDropout draws from torch's generator exactly what fastlora's op draws at that point of the stream
(``fastlora_mask``) and applies x ⊙ keep / (1 − p).

What the op draws (fastlora.core.dropout): torch code on the CPU (the torch backend of lora_linear / qlora_linear;
DoRA on any backend, its GEMMs are torch's) takes u = torch.rand(M, K) from the default generator; otherwise
one seed (fastlora.core.dropout.new_seed) keys the kernels' Philox mask. The multi-adapter op always draws a seed;
on the CPU torch path a generator seeded with it draws u."""
from peft.tuners.lora import layer as peft_lora
from torch import nn

from fastlora.core.backend import select_backend
from fastlora.core.dropout import keep_mask, new_seed, torch_keep_mask

OPS = ("lora", "dora", "multi")


def fastlora_mask(x, p, op="lora", backend=None):
    """The boolean (M, K) mask fastlora's ``op`` draws for x (..., K) now, drawn the same way (same RNG use);
    ``backend``: the op's backend argument (None: what FASTLORA_BACKEND selects)."""
    assert op in OPS, op
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    torch_code = x.device.type == "cpu" and (op == "dora" or select_backend(x.device, backend) == "torch")
    if torch_code and op != "multi":
        return torch_keep_mask(None, M, K, p, x.device)
    seed = new_seed(x.device)
    return torch_keep_mask(seed, M, K, p, x.device) if torch_code else keep_mask(seed, M, K, p, x.device)


def mask_of(backend, seed, M, K, p, device="cpu"):
    """The boolean (M, K) mask lora_linear draws for ``seed`` on ``backend`` (CPU tensors): the torch path's
    torch.rand mask, or the kernels' Philox mask."""
    return torch_keep_mask(seed, M, K, p, device) if backend == "torch" else keep_mask(seed, M, K, p, device)


class ReplayDropout(nn.Module):
    def __init__(self, p, op="lora", backend=None):
        super().__init__()
        self.p, self.op, self.backend = p, op, backend

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = fastlora_mask(x, self.p, self.op, self.backend)
        return x * keep.reshape(x.shape) / (1 - self.p)


def replay_dropout(model, op="lora", backend=None):
    """Swap every nn.Dropout of a PEFT LoraLayer (lora_dropout dict) or loralib layer (lora_dropout module) for
    a ReplayDropout of fastlora's ``op`` ("lora": lora_linear / qlora_linear, "dora", "multi") on ``backend``
    (None: what FASTLORA_BACKEND selects)."""
    for m in model.modules():
        if isinstance(m, peft_lora.LoraLayer):
            for k, d in m.lora_dropout.items():
                if isinstance(d, nn.Dropout):
                    m.lora_dropout[k] = ReplayDropout(d.p, op, backend)
        elif isinstance(getattr(m, "lora_dropout", None), nn.Dropout):
            m.lora_dropout = ReplayDropout(m.lora_dropout.p, op, backend)
    return model
