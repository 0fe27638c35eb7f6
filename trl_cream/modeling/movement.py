"""How far a round moved the weights: ``‖θ_k − θ_{k−1}‖ / ‖θ_{k−1}‖`` between two checkpoints.

A ranking consistency C near 1 between ``M_{k}`` and ``M_{k−1}`` means "consistent" only if the two differ: an
iteration that barely moved has C = 1 trivially. This figure, reported beside C, tells the two apart. For LoRA
checkpoints θ is every adapter tensor (LoRA A and B of every module), for full checkpoints every weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

ADAPTER_FILE = "adapter_model.safetensors"
FULL_FILE = "model.safetensors"


def relative_change(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """``‖new − old‖ / ‖old‖`` over all tensors together (Frobenius norms, in float64).

    Both must hold the same tensor names and shapes. Returns ``inf`` when ``old`` is all zeros and ``new`` is not
    (e.g. a fresh LoRA B), and 0 when both are.
    """
    if set(old) != set(new):
        missing, extra = sorted(set(old) - set(new))[:3], sorted(set(new) - set(old))[:3]
        raise ValueError(
            f"The two checkpoints hold different tensors (only in the older: {missing}, only in the newer: {extra}); "
            "compare checkpoints of the same model and adapter configuration."
        )
    diff = sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in old)
    norm = sum(float(old[k].double().pow(2).sum()) for k in old)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return math.sqrt(diff / norm)


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The adapter tensors of a saved LoRA folder, or the weights of a single-file full model; ``None`` when the
    folder has neither (a sharded or non-safetensors checkpoint, or a Hub id)."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (ADAPTER_FILE, FULL_FILE):
        if (path / name).is_file():
            return load_file(str(path / name))
    return None


def module_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors of a `PeftModel` (as they would be saved), else every parameter."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach() for k, v in model.named_parameters()}


def weight_change(old: str | Path | torch.nn.Module, new: str | Path | torch.nn.Module) -> float | None:
    """Relative change ``‖θ_new − θ_old‖ / ‖θ_old‖`` from ``old`` to ``new`` (folders or loaded models), or ``None``
    when it cannot be measured (a checkpoint without a readable single-file state, or LoRA vs full weights)."""
    weights = []
    for checkpoint in (old, new):
        state = (
            module_weights(checkpoint) if isinstance(checkpoint, torch.nn.Module) else checkpoint_weights(checkpoint)
        )
        if state is None:
            return None
        weights.append(state)
    try:
        return relative_change(*weights)
    except ValueError:
        return None
