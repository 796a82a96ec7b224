"""The module paths of release 0.1, kept for one release as aliases of their new homes.

``import langevin_lora.callback`` (or ``class_path: langevin_lora.callback.LangevinLoRA`` in a YAML)
still works and returns the module object of the new path, with a :class:`DeprecationWarning`
naming it. An old module split in two (``samples``: the bank and, re-exported, the averaging) is a
read-only module that looks names up in its new homes in order. The aliases are removed in 0.3. Public names (``from langevin_lora import ...``) never
moved.

Written by hand because the standard library's import system has no declarative module alias:
a :class:`~importlib.abc.MetaPathFinder` that answers only for the names in :data:`MOVED` and
hands back the already-imported new module, so the alias and the new path are one module object
(same classes, same ``isinstance``).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: Old module path -> new module path(s) (release 0.2).
MOVED = {
    "langevin_lora._rng": "langevin_lora.core.rng",
    "langevin_lora.temperature": "langevin_lora.core.temperature",
    "langevin_lora.functional": "langevin_lora.core.functional",
    "langevin_lora.engine": "langevin_lora.core.engine",
    "langevin_lora.curvature": "langevin_lora.core.curvature",
    "langevin_lora.step_size": "langevin_lora.core.step_size",
    "langevin_lora.guard": "langevin_lora.core.guard",
    "langevin_lora.view": "langevin_lora.core.view",
    "langevin_lora.param_groups": "langevin_lora.lora.param_groups",
    "langevin_lora.gauge": "langevin_lora.lora.gauge",
    "langevin_lora.balance": "langevin_lora.lora.balance",
    "langevin_lora.samples": ("langevin_lora.posterior.bank", "langevin_lora.posterior.averaging"),
    "langevin_lora.bma": "langevin_lora.posterior.averaging",
    "langevin_lora.adapter_folders": "langevin_lora.posterior.adapter_folders",
    "langevin_lora.convergence": "langevin_lora.diagnostics.convergence",
    "langevin_lora.lora_callback": "langevin_lora.lightning.callback",
    "langevin_lora.callback": "langevin_lora.lightning.callback",
    "langevin_lora.chain": "langevin_lora.lightning.schedule",
    "langevin_lora._step_wrapper": "langevin_lora.lightning._step_wrapper",
    "langevin_lora._user_optimizer": "langevin_lora.lightning._user_optimizer",
    "langevin_lora._replay": "langevin_lora.diagnostics.replay",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        homes = (new,) if isinstance(new, str) else new
        warnings.warn(f"{spec.name} moved to {' and '.join(homes)} in langevin-lora 0.2; the old path is removed "
                      f"in 0.3. Import from there (or the public names from langevin_lora).",
                      DeprecationWarning, stacklevel=2)
        modules = [importlib.import_module(m) for m in homes]
        if len(modules) == 1:
            return modules[0]
        merged = ModuleType(spec.name, f"Alias of {' and '.join(homes)} (deprecated).")

        def __getattr__(name: str):
            for module in modules:
                if hasattr(module, name):
                    return getattr(module, name)
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

        merged.__getattr__ = __getattr__
        return merged

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())   # before the path finders, which would find nothing
