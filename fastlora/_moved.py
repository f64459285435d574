"""The module paths of fastlora before its layers (0.1 → layered tree), kept importable with a DeprecationWarning.

``import fastlora.functional`` (or ``from fastlora.patching import patch``, or unpickling an object of a moved
class) still works: a finder on ``sys.meta_path`` answers the old names with a small module
that warns once, naming the new path, and reads every attribute from the new modules. The public API is
``fastlora``'s own namespace (``fastlora.__all__``), unchanged.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module -> the modules its names live in now (looked up in this order)
MOVED = {
    "fastlora.backend": ("fastlora.core.backend",),
    "fastlora.dropout": ("fastlora.core.dropout",),
    "fastlora._amp": ("fastlora.core.amp",),
    "fastlora.tracing": ("fastlora.core.tracing",),
    "fastlora.functional": ("fastlora.ops.lora", "fastlora.core.checks"),
    "fastlora.reference": ("fastlora.ops.lora",),
    "fastlora.modules": ("fastlora.nn.lora",),
    "fastlora.bank": ("fastlora.ops.bank", "fastlora.integrations.checkpoint"),
    "fastlora.multi_plan": ("fastlora.ops.multi_plan",),
    "fastlora.multi_reference": ("fastlora.ops.multi_reference",),
    "fastlora.multi": ("fastlora.ops.multi", "fastlora.nn.multi", "fastlora.ops.multi_plan",
                       "fastlora.integrations.multi_peft"),
    "fastlora.dora": ("fastlora.ops.dora", "fastlora.nn.dora", "fastlora.integrations.peft_dora"),
    "fastlora.qlora": ("fastlora.ops.qlora", "fastlora.nn.lora", "fastlora.integrations.peft_qlora"),
    "fastlora.moe": ("fastlora.ops.moe", "fastlora.nn.moe"),
    "fastlora.patching": ("fastlora.integrations.patching", "fastlora.integrations.peft_layers"),
    "fastlora.multi_peft": ("fastlora.integrations.multi_peft",),
    "fastlora.moe_peft": ("fastlora.integrations.moe_peft",),
    "fastlora.checkpoint": ("fastlora.integrations.checkpoint",),
}

# What an old module runs: warn, then read names from the new modules.
_SOURCE = '''
import importlib as _importlib
import warnings as _warnings

_NEW = {new!r}
_warnings.warn("{old} moved to " + " / ".join(_NEW) + "; import from there (or from fastlora)",
               DeprecationWarning, stacklevel=2)


def __getattr__(name):
    for path in _NEW:
        module = _importlib.import_module(path)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {old!r} has no attribute {{name!r}} (it moved to {{' / '.join(_NEW)}})")
'''


class _Loader(importlib.abc.InspectLoader):
    def is_package(self, fullname: str) -> bool:
        return False

    def get_source(self, fullname: str) -> str:
        return _SOURCE.format(old=fullname, new=MOVED[fullname])


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Loader(), origin="moved")
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
