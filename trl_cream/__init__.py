"""trl-cream: Consistency Regularized sElf-rewarding lAnguage Models (CREAM) for Hugging Face TRL.

``import trl_cream`` is cheap: `CreamConfig` and `CreamTrainer` (and with them torch, transformers and TRL) are
imported on first access, so that ``trl-cream --help`` answers without loading them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer.config import CreamConfig
    from .trainer.trainer import CreamTrainer

__version__ = "0.1.0"

__all__ = ["CreamConfig", "CreamTrainer", "__version__"]

_LAZY: dict[str, str] = {"CreamConfig": ".trainer.config", "CreamTrainer": ".trainer.trainer"}


def __getattr__(name: str) -> Any:
    """``trl_cream.CreamConfig`` / ``trl_cream.CreamTrainer``, imported on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
