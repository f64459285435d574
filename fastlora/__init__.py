"""fastlora: fused Triton kernels for LoRA (Hu et al. 2021).

    y = x·W0ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ        s = alpha / r

Public API:
    lora_linear                     the fused op (functional, differentiable)
    lora_linear_reference           the same maths in plain torch (the test oracle)
    LoraLinear, MergedLoraLinear    nn.Modules over the fused op, exact merge/unmerge
    patch, unpatch, is_patched      route PEFT / loralib LoRA layers through the fused op
    load_peft_adapter, save_peft_adapter   PEFT's checkpoint format, PEFT not required
    AdapterBank, MultiLoraLinear, MultiAdapterModel, multi_lora_linear   many adapters in one batch
    plan_batch, BatchPlan           a multi-adapter batch's plan, built once per forward, shared by layers
    select_backend                  which backend a tensor's op will run on
    tune                            time the kernels' shipped tile configs on this GPU, cache the fastest
    qlora_linear, QLoraLinear       LoRA over a bitsandbytes 4-bit / 8-bit base (QLoRA)
    dora_linear, DoraLinear         DoRA (PEFT use_dora) without the N×K matrix W0 + s·B·A
    lora_experts, LoraExperts       LoRA on MoE experts (PEFT target_parameters) without E×out×in temporaries
    trace, FallbackWarning          what ran fused and what fell back (and why); the warning a fall-back raises

Layers (each imports only the ones below it; docs/ARCHITECTURE.md):
    fastlora.integrations   PEFT / loralib patching, PEFT multi-adapter wrapper, PEFT checkpoints
    fastlora.tune, .inspect the command-line tools (python -m fastlora.tune / fastlora.inspect)
    fastlora.nn             the modules
    fastlora.ops            one file per op: the maths in torch -> dispatch -> registered op -> functional
    fastlora.core           backend choice, dropout masks, autocast, input checks, tracing, op registration
    fastlora.kernels        the Triton kernels and their one launch policy
"""
from .core.backend import select_backend
from .core.tracing import FallbackWarning, trace
from .ops.lora import lora_linear, lora_linear_reference
from .ops.multi import multi_lora_linear
from .ops.multi_plan import BatchPlan, plan_batch
from .ops.bank import AdapterBank
from .ops.dora import dora_linear
from .ops.qlora import qlora_linear
from .ops.moe import lora_experts
from .nn.lora import LoraLinear, MergedLoraLinear, QLoraLinear
from .nn.dora import DoraLinear
from .nn.multi import MultiLoraLinear
from .nn.moe import LoraExperts
from .integrations.patching import PatchReport, is_patched, patch, unpatch
from .integrations.checkpoint import AdapterLoadError, load_peft_adapter, save_peft_adapter
from .integrations.multi_peft import MultiAdapterModel
from .tune import tune
from . import _moved

__version__ = "0.1.0"
__all__ = ["lora_linear", "lora_linear_reference", "select_backend", "LoraLinear", "MergedLoraLinear",
           "patch", "unpatch", "is_patched", "PatchReport", "load_peft_adapter", "save_peft_adapter",
           "AdapterLoadError", "AdapterBank", "MultiLoraLinear", "MultiAdapterModel", "multi_lora_linear",
           "plan_batch", "BatchPlan",
           "qlora_linear", "QLoraLinear", "tune", "dora_linear", "DoraLinear", "lora_experts", "LoraExperts",
           "trace", "FallbackWarning", "__version__"]
