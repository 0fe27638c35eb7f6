"""Files of a run: atomic writes (temporary name, then ``os.replace``) and loading saved model weights."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from .integrity import DamagedFile, load_checked
from .layout import PARTIAL_SUFFIX


# ---------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_dir(path: Path, enabled: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    The temporary name is deterministic (``.<name>.partial``), so every process of a distributed run writes into
    the same folder; only the process with ``enabled=True`` (the main one) clears, renames or removes it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    if enabled:
        _remove(tmp)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if enabled:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if enabled:
        if path.exists():  # a stale result of an earlier attempt: move it aside first, then drop it
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)


def save_dataset(dataset: Dataset, path: Path, enabled: bool = True) -> None:
    """``dataset.save_to_disk(path)``, atomically."""
    with atomic_dir(path, enabled) as tmp:
        if enabled:
            dataset.save_to_disk(str(tmp))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (with string ``metadata``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- model weights
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
        return load_checked(file, lambda: load_file(str(file)))
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
