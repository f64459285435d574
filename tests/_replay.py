"""Make a PEFT / loralib model draw fastlora's dropout masks, so both sides of a parity test see the same
masks: ReplayDropout draws its seed from torch's generator exactly as fastlora.lora_linear does (one
fastlora.dropout.new_seed per call) and applies fastlora.dropout.keep_mask(seed, M, K, p) / (1 − p)."""
from peft.tuners.lora import layer as peft_lora
from torch import nn

from fastlora.dropout import keep_mask, new_seed


class ReplayDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = keep_mask(new_seed(x.device), x.numel() // x.shape[-1], x.shape[-1], self.p, x.device)
        return x * keep.reshape(x.shape) / (1 - self.p)


def replay_dropout(model):
    """Swap every nn.Dropout of a PEFT LoraLayer (lora_dropout dict) or loralib layer (lora_dropout module)."""
    for m in model.modules():
        if isinstance(m, peft_lora.LoraLayer):
            for k, d in m.lora_dropout.items():
                if isinstance(d, nn.Dropout):
                    m.lora_dropout[k] = ReplayDropout(d.p)
        elif isinstance(getattr(m, "lora_dropout", None), nn.Dropout):
            m.lora_dropout = ReplayDropout(m.lora_dropout.p)
    return model
