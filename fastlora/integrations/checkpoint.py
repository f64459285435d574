"""PEFT LoRA checkpoints <-> fastlora modules, without PEFT installed.

A PEFT adapter directory holds
    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors    "base_model.model.<module path>.lora_A.weight"  (r, in_features)
                                 "base_model.model.<module path>.lora_B.weight"  (out_features, r)
                                 "base_model.model.<module path>.lora_magnitude_vector"  (out_features,)
                                                                 (DoRA, use_dora=True: fastlora.DoraLinear)

``load_peft_adapter(model, path)`` puts a fastlora LoraLinear (sharing the base layer's weight and
bias) at every targeted nn.Linear / transformers Conv1D of ``model`` (a plain transformers model,
not a PeftModel) and loads the adapter into it. Everything is read and checked first — config
fields, key names, shapes, ranks, module types — and the model is changed only once all checks
pass, so a failed load leaves it exactly as it was. ``save_peft_adapter(model, path)`` writes the
LoraLinear modules of ``model`` in the same format, loadable by ``PeftModel.from_pretrained``.
``load_peft_adapter_into_banks(banks, path, name)`` adds such an adapter to multi-adapter AdapterBanks.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

from typing import Mapping

import torch
from torch import Tensor, nn

from ..core.checks import is_conv1d
from ..nn.dora import DoraLinear
from ..nn.lora import LoraLinear, MergedLoraLinear, base_layout, check_rank
from ..ops.bank import AdapterBank

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<path>.+)\.(?:lora_(?P<ab>[AB])\.weight|(?P<m>lora_magnitude_vector))$")
# Config fields whose non-default values change the maths or the set of weights: refuse them.
_UNSUPPORTED = {"modules_to_save": None, "bias": "none", "lora_bias": False,
                "layers_to_transform": None, "target_parameters": None, "trainable_token_indices": None}


class AdapterLoadError(ValueError):
    """A PEFT adapter checkpoint that does not fit the model (names the key or module path)."""


def _matches(name: str, targets) -> bool:
    """PEFT's target_modules / exclude_modules rule: a regex string (fullmatch) or a list of names
    matched exactly or as the last dotted components."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(path: str):
    """(config dict, {key: tensor}) of a PEFT adapter directory; errors name the missing file."""
    from safetensors.torch import load_file
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"PEFT adapter file not found: {f}")
    with open(cfg_file) as fh:
        config = json.load(fh)
    return config, load_file(w_file)


def _check_config(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{CONFIG_NAME}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for field, default in _UNSUPPORTED.items():
        value = config.get(field, default)
        if value not in (default, None, [], {}):
            raise AdapterLoadError(f"{CONFIG_NAME}: {field}={value!r} is not supported by fastlora "
                                   f"(supported: {default!r})")
    if config.get("target_modules") in ("all-linear", None):
        raise AdapterLoadError(f"{CONFIG_NAME}: target_modules must list module names or be a regex, "
                               f"got {config.get('target_modules')!r}")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise AdapterLoadError(f"{CONFIG_NAME}: {field} must be a number, got {config.get(field)!r}")


def _plan(model: nn.Module, config: dict, tensors: dict):
    """Check everything; return [(path, module, A, B, r, alpha)] without touching the model."""
    _check_config(config)
    by_path: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else "")
        if m is None:
            raise AdapterLoadError(f"{WEIGHTS_NAME}: unexpected key {key!r} (expected "
                                   f"'{PREFIX}<module path>.lora_A.weight' / '.lora_B.weight')")
        by_path.setdefault(m["path"], {})[m["ab"] or "m"] = t
    modules = dict(model.named_modules())
    targets = config["target_modules"]
    targeted = {n for n in modules if n and _matches(n, targets)
                and not _matches(n, config.get("exclude_modules"))}
    for path in sorted(set(by_path) - targeted):
        why = "no such module in the model" if path not in modules else "not matched by target_modules"
        raise AdapterLoadError(f"{WEIGHTS_NAME}: unexpected adapter weights for module {path!r} ({why})")
    plan = []
    for path in sorted(targeted):
        mod = modules[path]
        servable = isinstance(mod, (LoraLinear, nn.Linear)) or is_conv1d(mod)
        if not servable or isinstance(mod, MergedLoraLinear):
            raise AdapterLoadError(f"module {path!r} matched target_modules but is a {type(mod).__name__}; "
                                   f"fastlora loads LoRA into nn.Linear / transformers Conv1D only")
        ab = by_path.get(path, {})
        dora = bool(config.get("use_dora", False))
        for x in "AB" + ("m" if dora else ""):
            if x not in ab:
                name = "lora_magnitude_vector" if x == "m" else f"lora_{x}.weight"
                raise AdapterLoadError(f"{WEIGHTS_NAME}: missing key {PREFIX}{path}.{name} "
                                       f"for targeted module {path!r}" + (" (use_dora=True)" if dora else ""))
        if "m" in ab and not dora:
            raise AdapterLoadError(f"{WEIGHTS_NAME}: unexpected key {PREFIX}{path}.lora_magnitude_vector "
                                   f"(a DoRA weight, but {CONFIG_NAME} has use_dora=False)")
        if isinstance(mod, LoraLinear) and isinstance(mod, DoraLinear) != dora:
            raise AdapterLoadError(f"module {path!r} is a {type(mod).__name__}, the checkpoint has "
                                   f"use_dora={dora}")
        if isinstance(mod, LoraLinear):
            k, n = mod.in_features, mod.out_features
        else:
            _, _, k, n, _ = base_layout(mod, path)
        r = pattern_value(config.get("rank_pattern"), path, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        try:
            check_rank(r, k, n, f"module {path!r}")
        except (TypeError, ValueError) as e:
            raise AdapterLoadError(str(e)) from None
        A, B = ab["A"], ab["B"]
        if tuple(A.shape) != (r, k) or tuple(B.shape) != (n, r):
            raise AdapterLoadError(f"module {path!r}: expected lora_A ({r}, {k}) and lora_B ({n}, {r}) "
                                   f"(r={r}, in={k}, out={n}); the checkpoint has lora_A {tuple(A.shape)}, "
                                   f"lora_B {tuple(B.shape)}")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterLoadError(f"module {path!r}: lora_A/lora_B must be floating point, got {A.dtype}")
        if dora and (tuple(ab["m"].shape) != (n,) or not ab["m"].is_floating_point()):
            raise AdapterLoadError(f"module {path!r}: expected a floating-point lora_magnitude_vector ({n},), "
                                   f"the checkpoint has {tuple(ab['m'].shape)} {ab['m'].dtype}")
        plan.append((path, mod, A, B, int(r), alpha, ab.get("m")))
    return plan


def load_peft_adapter(model: nn.Module, path: str, *, adapter_dtype: torch.dtype | None = None,
                      merge_weights: bool = False) -> dict[str, LoraLinear]:
    """Load a PEFT LoRA adapter directory into ``model``; returns {module path: LoraLinear}.

    Targeted nn.Linear / Conv1D layers are replaced by LoraLinear wrappers sharing their weight and
    bias (base weights become frozen, as in PEFT); existing LoraLinear layers are loaded in place.
    adapter_dtype: default float32 on a half base (PEFT's default), else the base weight's dtype.
    Raises AdapterLoadError (a ValueError) naming the key or module path; the model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config, tensors = read_adapter(path)
    plan = _plan(model, config, tensors)
    if not plan:
        raise AdapterLoadError(f"{CONFIG_NAME}: target_modules {config['target_modules']!r} match no module")
    rslora, p = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0) or 0.0)
    # Build everything off-model first (from_linear freezes base weights: remember and restore on error).
    frozen = {id(m): (m.weight, m.weight.requires_grad) for _, m, *_ in plan}
    built = []
    try:
        for name, mod, A, B, r, alpha, mag in plan:
            if isinstance(mod, LoraLinear):
                if mod.r != r:
                    raise AdapterLoadError(f"module {name!r}: existing LoraLinear has r={mod.r}, checkpoint r={r}")
                new = mod
            else:
                w = mod.weight
                # fp32 adapters on a half base (PEFT's default) and on a quantized one (packed integer storage)
                dt = adapter_dtype or (w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32)
                cls = LoraLinear if mag is None else DoraLinear
                new = cls.from_linear(mod, r, alpha, p, rslora, merge_weights, adapter_dtype=dt)
            built.append((name, new, A, B, alpha, mag))
    except Exception:
        for w, req in frozen.values():
            w.requires_grad_(req)
        raise
    out = {}
    for name, new, A, B, alpha, mag in built:
        with torch.no_grad():
            new.lora_A.copy_(A)
            new.lora_B.copy_(B)
            if mag is not None:
                new.lora_magnitude_vector.copy_(mag)
        new.lora_alpha, new.use_rslora = alpha, rslora
        new.scaling = alpha / (new.r ** 0.5) if rslora else alpha / new.r
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        out[name] = new
    return out


def save_peft_adapter(model: nn.Module, path: str, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> dict:
    """Write ``model``'s LoraLinear adapters as a PEFT adapter directory; returns the config written."""
    from safetensors.torch import save_file
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for n, m in model.named_modules():
        if isinstance(m, MergedLoraLinear):
            raise TypeError(f"module {n!r} is a MergedLoraLinear (loralib enable_lora slices), which PEFT's "
                            f"format cannot express; save it with loralib.lora_state_dict instead")
    if not layers:
        raise ValueError("model has no fastlora LoraLinear modules to save")
    if any(not n for n in layers):
        raise ValueError("the model itself is a LoraLinear; wrap it in a parent module to save it")
    if len({m.use_rslora for m in layers.values()}) > 1:
        raise ValueError("LoraLinear modules mix use_rslora True and False; PEFT's config holds one value")
    dora = {isinstance(m, DoraLinear) for m in layers.values()}
    if len(dora) > 1:
        raise ValueError("the model mixes DoraLinear and LoraLinear modules; PEFT's config holds one use_dora")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(layers), "exclude_modules": None,
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {re.escape(n): m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "lora_dropout": max(m.lora_dropout for m in layers.values()),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "use_rslora": next(iter(layers.values())).use_rslora, "bias": "none", "lora_bias": False,
        "use_dora": dora == {True}, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for n, m in layers.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
        if isinstance(m, DoraLinear):
            tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    return config


# ---------------------------------------------------------------------------- into multi-adapter banks

def read_peft_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json as a dict, tensors of adapter_model.safetensors) of a PEFT LoRA adapter folder."""
    config, tensors = read_adapter(os.fspath(path))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise ValueError(f"{path}: a DoRA adapter (use_dora=True); the multi-adapter bank computes plain LoRA only "
                         f"(load it with fastlora.load_peft_adapter, which builds DoraLinear layers)")
    return config, tensors


def load_peft_adapter_into_banks(banks: Mapping[str, AdapterBank], path: str | os.PathLike, name: str, *,
                      prefix: str = "base_model.model.") -> None:
    """Add the PEFT adapter saved at ``path`` as ``name`` to every bank; banks maps module path -> bank.

    Module path as in the base model (e.g. "model.layers.0.self_attn.q_proj"); the checkpoint's keys are
    ``{prefix}{module}.lora_A.weight`` / ``.lora_B.weight``. Rank and alpha come from the config (with
    rank_pattern / alpha_pattern, use_rslora); a tensor whose rank differs from the config is an error.
    All banks are checked before any is changed: on error, none is modified.
    """
    config, tensors = read_peft_checkpoint(path)
    staged = []
    for module, bank in banks.items():
        keys = [f"{prefix}{module}.lora_A.weight", f"{prefix}{module}.lora_B.weight"]
        for key in keys:
            if key not in tensors:
                raise KeyError(f"{path}: no tensor {key!r} for module {module!r}")
        A, B = tensors[keys[0]], tensors[keys[1]]
        r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        if A.dim() != 2 or A.shape[0] != r or B.dim() != 2 or B.shape[-1] != r:
            raise ValueError(f"{path}: rank mismatch for module {module!r}: config says r = {r}, tensors have "
                             f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}")
        if name in bank:
            raise ValueError(f"adapter {name!r} already exists in the bank of {module!r}")
        bank._checked(name, A, B, None, alpha, bool(config.get("use_rslora", False)))
        staged.append((bank, A, B, alpha))
    for bank, A, B, alpha in staged:
        bank.add(name, A, B, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)))
