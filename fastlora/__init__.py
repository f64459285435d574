"""fastlora: fused Triton kernels for LoRA (Hu et al. 2021).

    y = x·W0ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ        s = alpha / r

Public API:
    lora_linear            the fused op (functional, differentiable)
    lora_linear_reference  the same maths in plain torch (the test oracle)
    select_backend         which backend a tensor's op will run on
"""
from .backend import select_backend
from .functional import lora_linear
from .reference import lora_linear_reference

__version__ = "0.1.0"
__all__ = ["lora_linear", "lora_linear_reference", "select_backend", "__version__"]
