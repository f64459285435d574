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
"""
from .backend import select_backend
from .bank import AdapterBank
from .checkpoint import AdapterLoadError, load_peft_adapter, save_peft_adapter
from .dora import DoraLinear, dora_linear
from .functional import lora_linear
from .modules import LoraLinear, MergedLoraLinear
from .moe import LoraExperts, lora_experts
from .multi import MultiLoraLinear, multi_lora_linear
from .multi_peft import MultiAdapterModel
from .multi_plan import BatchPlan, plan_batch
from .patching import PatchReport, is_patched, patch, unpatch
from .qlora import QLoraLinear, qlora_linear
from .reference import lora_linear_reference
from .tracing import FallbackWarning, trace
from .tune import tune

__version__ = "0.1.0"
__all__ = ["lora_linear", "lora_linear_reference", "select_backend", "LoraLinear", "MergedLoraLinear",
           "patch", "unpatch", "is_patched", "PatchReport", "load_peft_adapter", "save_peft_adapter",
           "AdapterLoadError", "AdapterBank", "MultiLoraLinear", "MultiAdapterModel", "multi_lora_linear",
           "plan_batch", "BatchPlan",
           "qlora_linear", "QLoraLinear", "tune", "dora_linear", "DoraLinear", "lora_experts", "LoraExperts",
           "trace", "FallbackWarning", "__version__"]
