"""Loading a saved ``M<k>`` back into a live model (resume): the full safetensors weights, or one LoRA adapter.
A damaged weight file is named, with what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .files import read_json
from .integrity import DamagedFile, load_checked


def _weight_files(path: Path, adapter: bool) -> list[Path]:
    stem = "adapter_model" if adapter else "model"
    index = path / f"{stem}.safetensors.index.json"
    if index.exists():
        return sorted({path / name for name in read_json(index)["weight_map"].values()})
    single = path / f"{stem}.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{path} holds no {single.name}: only safetensors checkpoints are resumed from. Was the run saved with "
            "save_safetensors=False? Start a new run."
        )
    return [single]


def _load_weights(file: Path, folder: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_checked(file, lambda: load_file(str(file)))
        bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise DamagedFile(f"{file} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]})")
        return tensors
    except DamagedFile as error:
        raise DamagedFile(
            f"{error}. The saved iteration {folder} is damaged: delete that folder and resume; the round that saved "
            "it is redone from its saved phases (the starting policy is saved again from the model you pass)."
        ) from None


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the safetensors weights saved in ``path`` into ``model`` in place (tied weights included)."""
    params = model.state_dict()
    loaded: set[str] = set()
    for file in _weight_files(Path(path), adapter=False):
        for name, tensor in _load_weights(file, Path(path)).items():
            if name not in params:
                raise ValueError(f"{file} holds {name!r}, which the model does not have: is it the same architecture?")
            params[name].copy_(tensor.to(params[name].dtype))
            loaded.add(name)
    pointers = {params[n].data_ptr() for n in loaded}
    missing = [n for n in params if n not in loaded and params[n].data_ptr() not in pointers]
    if missing:
        raise ValueError(f"{path} lacks weights for {missing[:5]}: it is not a checkpoint of this model.")


@torch.no_grad()
def load_adapter_weights(model: Any, adapter_name: str, path: Path) -> None:
    """Load a LoRA adapter saved in ``path`` into the existing adapter ``adapter_name`` of a PeftModel."""
    from peft import set_peft_model_state_dict

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path), adapter=True):
        state.update(_load_weights(file, Path(path)))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"The adapter in {path} does not fit adapter {adapter_name!r}: unexpected {unexpected[:5]}.")
