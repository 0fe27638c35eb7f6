"""Import paths of the 0.1 layout (``trl_cream.sampling``, ``trl_cream.cream_trainer``, ...), kept working.

The modules moved into layer folders (`docs/architecture.md`); ``import trl_cream.<old name>`` returns the moved
module itself (the same object), so attributes, monkeypatching and ``isinstance`` checks keep behaving.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED_MODULES: dict[str, str] = {
    "trl_cream.consistency": "trl_cream.core.consistency",
    "trl_cream.rewards": "trl_cream.core.rewards",
    "trl_cream.loss": "trl_cream.core.loss",
    "trl_cream.artifacts": "trl_cream.core.labelling",
    "trl_cream.sampling": "trl_cream.modeling.sampling",
    "trl_cream.adapters": "trl_cream.modeling.adapters",
    "trl_cream.reward_sources": "trl_cream.modeling.reward_sources",
    "trl_cream.perf": "trl_cream.modeling.perf",
    "trl_cream.checkpointing": "trl_cream.runs.store",
    "trl_cream.manifest": "trl_cream.runs.manifest",
    "trl_cream.hub_utils": "trl_cream.hub.utils",
    "trl_cream.model_card": "trl_cream.hub.model_card",
    "trl_cream.cream_config": "trl_cream.trainer.config",
    "trl_cream.cream_trainer": "trl_cream.trainer.trainer",
    "trl_cream.phases": "trl_cream.trainer.phases",
    "trl_cream.resume": "trl_cream.trainer.resume",
    "trl_cream.validation": "trl_cream.trainer.validation",
    "trl_cream.data": "trl_cream.trainer.data",
    "trl_cream.sft": "trl_cream.trainer.sft",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The moved module is already executed."""


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
