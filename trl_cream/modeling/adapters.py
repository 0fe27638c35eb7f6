"""Several LoRA adapters on one base model: the trainable policy ``π_t``, the frozen ``π_{t−1}``, and ``π_0`` as
the base with adapters disabled. Base weights are shared, never copied."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

PREVIOUS_ADAPTER = "cream_previous"


def policy_adapter_name(model: PeftModel) -> str:
    """The adapter being trained: the model's active adapter."""
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


def freeze_adapter(model: PeftModel, name: str) -> None:
    """Stop gradients to every parameter of adapter ``name``."""
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)


def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    """Make ``target`` a frozen copy of adapter ``source`` (created on first use); the active adapter is kept."""
    if target not in model.peft_config:
        model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    state = get_peft_model_state_dict(model, adapter_name=source)
    with torch.no_grad():
        set_peft_model_state_dict(model, {k: v.detach().clone() for k, v in state.items()}, adapter_name=target)
    freeze_adapter(model, target)


@contextmanager
def using_adapter(model: PeftModel, name: str) -> Iterator[PeftModel]:
    """Run the block with adapter ``name`` active and frozen, then give the policy adapter back its gradients."""
    policy = policy_adapter_name(model)
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(policy)
        freeze_adapter(model, name)


def is_identity_adapter(model: PeftModel, name: str) -> bool | None:
    """Whether LoRA adapter ``name`` leaves the base model unchanged (every ``lora_B`` is zero).

    Returns `None` for adapter types other than LoRA, where this cannot be told from the weights.
    """
    if getattr(model.peft_config[name], "peft_type", None) != "LORA":
        return None
    found = False
    for param_name, param in model.named_parameters():
        if ("lora_B" in param_name or "lora_embedding_B" in param_name) and f".{name}" in param_name:
            found = True
            if torch.count_nonzero(param.detach()) > 0:
                return False
    return found


def save_adapter(model: PeftModel, name: str, path: str | Path) -> None:
    """Save adapter ``name`` alone, at the top of ``path`` whatever its name (PEFT nests non-default names)."""
    path = Path(path)
    model.save_pretrained(str(path), selected_adapters=[name])
    nested = path / name
    if name != "default" and (nested / "adapter_config.json").exists():
        for item in nested.iterdir():
            shutil.move(str(item), str(path / item.name))
        nested.rmdir()
