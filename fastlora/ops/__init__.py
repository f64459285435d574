"""One file per op, each read top to bottom: the maths in torch -> dispatch -> registered op -> functional.

    lora.py   the LoRA linear op            multi.py (+ multi_plan, multi_reference, bank)  many adapters per batch
    dora.py   DoRA                          qlora.py   LoRA over a bitsandbytes base
    moe.py    LoRA on MoE experts
"""


def __getattr__(name):
    """``fastlora.ops`` was the LoRA op's module before the layers; its names live in ``fastlora.ops.lora`` now."""
    import importlib
    import warnings
    lora = importlib.import_module(__name__ + ".lora")
    if not name.startswith("__") and hasattr(lora, name):
        warnings.warn(f"fastlora.ops.{name} moved to fastlora.ops.lora.{name}", DeprecationWarning, stacklevel=2)
        return getattr(lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
