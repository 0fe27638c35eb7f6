"""Files of a run: atomic writes (a temporary name, then ``os.replace``)."""

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
from safetensors.torch import save_file

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


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file name next to ``path`` (``.<name>.partial``) to write; on success it is flushed to disk
    and renamed onto ``path`` in one ``os.replace``; on an error it is removed and ``path`` is left as it was. The
    one atomic file writer of the package (text, JSON, safetensors, push markers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
    """A safetensors file (with string ``metadata``), atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
