"""trl-cream: Consistency Regularized sElf-rewarding lAnguage Models (CREAM) for Hugging Face TRL."""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from ._compat import install as _install_moved_modules  # noqa: E402

_install_moved_modules()

from .trainer.config import CreamConfig  # noqa: E402
from .trainer.trainer import CreamTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CreamConfig", "CreamTrainer", "__version__"]
