"""PEFT's LoRA on MoE experts (``LoraConfig(target_parameters=[...experts.gate_up_proj, ...down_proj])``) under
fastlora.patch: the fused experts op instead of PEFT's parametrization.

PEFT wraps each targeted 3-D parameter in a ``lora.ParamWrapper``, nested one per parameter, the outermost at
``<moe block>.experts``:  ParamWrapper(down_proj) → .base_layer ParamWrapper(gate_up_proj) → .base_layer the
transformers experts module (e.g. Qwen3MoeExperts). Its forward registers a parametrization W' = W + s·B_e·A_e on
every expert stack (a new E × out × in tensor per projection and call, kept for backward, with its dense
gradient), then runs the experts module on W'. fastlora.patch shadows the OUTERMOST wrapper's forward (an
instance attribute, as for lora.Linear: same objects, parameters, state-dict keys, save/load, unpatch) with
``peft_experts_forward``, which walks the chain (``.base_layer`` while it is a ParamWrapper), reads each
wrapper's active lora_A / lora_B / scaling as they are (PEFT's layout: fastlora.ops.moe takes it) and calls
fastlora.ops.moe.experts_forward on the experts module: its own weights, biases, orientation, ``_apply_gate`` and
``post_expert_norm``; PEFT's parametrization never runs. The computation is transformers' grouped_mm experts
implementation's (x cast to the experts' dtype, the sum over k in the routing weights' dtype) whatever
``config._experts_implementation`` says; the last bits may differ from eager / batched_mm, as those do from each
other.

Served: the chain's base is a class decorated with @use_experts_implementation (standard layout: Qwen3-MoE,
Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V2/V3, PhiMoE, ... and gpt-oss, transposed with biases and its clamped,
interleaved ``_apply_gate``), wrappers on gate_up_proj (or up_proj) and / or down_proj, one active adapter.
Not served (patch report, with the reason): anything else (e.g. Llama4's undecorated experts), hooks inside
the chain (accelerate offload would be bypassed), expert parallelism, fp8 weights. Per call, handed back to
PEFT's own forward: adapters disabled or merged, ``adapter_names`` (PEFT refuses mixed batches itself); and, warned
once per layer and reason, several active adapters, hooks or a parametrization added inside the chain after
patching, expert parallelism switched on.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core import tracing
from ..ops.moe import ExpertLora, experts_forward, experts_layout
from .peft_layers import _ATTR, _optional

KIND = "peft.ParamWrapper(experts)"


def param_wrapper_cls():
    return _optional("peft.tuners.lora.layer", "ParamWrapper")     # None: PEFT absent, or too old for target_parameters


def chain(outer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """([wrappers, outermost first], the experts module at the end of the chain)."""
    pw = param_wrapper_cls()
    wrappers, m = [], outer
    while isinstance(m, pw):
        wrappers.append(m)
        m = m.base_layer
    return wrappers, m


def inner_wrappers(model: nn.Module) -> set[int]:
    """ids of the ParamWrappers that sit inside another one (served, or not, through their outermost)."""
    pw = param_wrapper_cls()
    if pw is None:
        return set()
    return {id(m.base_layer) for m in model.modules() if isinstance(m, pw) and isinstance(m.base_layer, pw)}


def _active(wrappers) -> list[str]:
    """The active adapters that have weights somewhere in the chain."""
    names: dict = {}
    for w in wrappers:
        act = w.active_adapters
        for a in ([act] if isinstance(act, str) else act):
            if a in w.lora_A:
                names[a] = None
    return list(names)


def _routing_names(experts: nn.Module) -> tuple[str, str] | None:
    """The names of the experts forward's 2nd and 3rd arguments (top_k_index / top_k_weights; gpt-oss:
    router_indices / routing_weights), read through @use_experts_implementation's functools.wraps."""
    try:
        params = list(inspect.signature(type(experts).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (pos[1].name, pos[2].name) if len(pos) >= 3 else None


def _adapter_reason(wrappers, experts) -> str | None:
    """Why the chain's active adapter cannot be served (None if it can): checked at patch time and per call."""
    active = _active(wrappers)
    if len(active) != 1:
        return f"{len(active)} active adapters {active} on the experts (fastlora serves exactly one)"
    a = active[0]
    E = experts.num_experts
    for w in wrappers:
        if a not in w.lora_A:
            continue
        if a in getattr(w, "lora_variant", {}) or getattr(w, "lora_bias", {}).get(a, False):
            return f"adapter {a!r} on {w.parameter_name} is a LoRA variant or has lora_bias"
        W = getattr(experts, w.parameter_name)
        A, B = w.lora_A[a].weight, w.lora_B[a].weight
        out_f, in_f = (W.shape[2], W.shape[1]) if experts.is_transposed else (W.shape[1], W.shape[2])
        if A.dim() != 2 or A.shape[0] % E or tuple(A.shape) != (A.shape[0], in_f) \
                or tuple(B.shape) != (out_f, A.shape[0]):
            return (f"{w.parameter_name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match "
                    f"{W.dim()}-D weight {tuple(W.shape)} with {E} experts")
        if A.dtype != B.dtype or A.dtype not in (W.dtype, torch.float32):
            return f"{w.parameter_name}: dtypes weight {W.dtype}, lora_A {A.dtype}, lora_B {B.dtype} not supported"
    return None


def _state_reason(wrappers, experts) -> str | None:
    """What can change after patching and stop a call from being served (None if it can be): checked at patch
    time and on every call."""
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids) is not served"
    for m in wrappers[1:] + [experts]:
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{type(m).__name__} inside the chain has forward hooks (fastlora's forward would bypass them)"
    if torch.nn.utils.parametrize.is_parametrized(experts):
        return "the experts module carries a parametrization"
    return _adapter_reason(wrappers, experts)


def chain_reason(outer: nn.Module) -> str | None:
    """Why fastlora.patch cannot serve this chain of ParamWrappers (None if it can)."""
    wrappers, experts = chain(outer)
    why = experts_layout(experts)
    if why:
        return why
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    names = [w.parameter_name for w in wrappers]
    if any(n not in (first, "down_proj") for n in names) or len(set(names)) != len(names):
        return f"ParamWrappers on {names}: fastlora serves LoRA on {first} and down_proj"
    if any(w._did_swap_in_out_features == bool(experts.is_transposed) for w in wrappers):
        return "PEFT's in/out orientation disagrees with the experts' is_transposed"
    if _routing_names(experts) is None:
        return f"{type(experts).__name__}.forward does not take (hidden_states, indices, weights)"
    return _state_reason(wrappers, experts)


class ChainState:
    """What a patched outermost wrapper keeps on the side (fastlora.integrations.patching's attribute; not in the state dict)."""

    def __init__(self, outer: nn.Module):
        self.kind = KIND
        self.routing = _routing_names(chain(outer)[1])
        self.warned: set = set()


def describe(outer: nn.Module) -> str:
    """The patch report's kind: 'peft.ParamWrapper(experts) gate_up_proj+down_proj on Qwen3MoeExperts'."""
    wrappers, experts = chain(outer)
    return f"{KIND} {'+'.join(w.parameter_name for w in reversed(wrappers))} on {type(experts).__name__}"


def _bind(st: ChainState, args, kwargs):
    """(top_k_index, top_k_weights) from the call's arguments, or None when they are not just those two."""
    if len(args) > 2 or kwargs.get("adapter_names") is not None:
        return None
    vals = list(args)
    rest = dict(kwargs)
    rest.pop("adapter_names", None)
    for name in st.routing[len(args):]:
        if name not in rest:
            return None
        vals.append(rest.pop(name))
    return None if any(v is not None for v in rest.values()) else vals


def peft_experts_forward(self, hidden_states, *args, **kwargs):
    """The outermost ParamWrapper's forward under fastlora.patch (see the module docstring)."""
    st = getattr(self, _ATTR)
    wrappers, experts = chain(self)
    bound = _bind(st, args, kwargs)
    quiet = bound is None or any(w.disable_adapters or w.merged for w in wrappers)
    why = None if quiet else _state_reason(wrappers, experts)
    if why is None and not quiet and not isinstance(hidden_states, torch.Tensor):
        why = f"hidden_states is {type(hidden_states).__name__}"
    if quiet or why is not None:
        if why is None:
            why = (tracing.DISABLED if any(w.disable_adapters for w in wrappers) else tracing.MERGED
                   if any(w.merged for w in wrappers) else "adapter_names= or arguments other than the routing")
        tracing.fall_back(self, getattr(st, "name", ""), st.warned, why)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    if tracing.ACTIVE:
        tracing.record(self, None, getattr(st, "name", ""))
    a = _active(wrappers)[0]
    loras = {w.parameter_name: ExpertLora(w.lora_A[a].weight, w.lora_B[a].weight, float(w.scaling[a]))
             for w in wrappers if a in w.lora_A}
    return experts_forward(experts, hidden_states, bound[0], bound[1], loras, training=self.training)


__all__ = ["peft_experts_forward", "chain_reason", "chain", "inner_wrappers", "describe", "ChainState", "KIND"]
