"""Where a command's inputs come from: a local path, checked before any Hub call, or a Hub id; a dataset from a
`save_to_disk` folder, a JSON/JSONL/CSV/Parquet file or the Hub. Imports `datasets` and the Hub client only when
called, so `trl-cream --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_DATA_FILES = {"json", "jsonl", "csv", "parquet"}


def check_local(spec: str, what: str) -> None:
    """Refuse a local path that does not exist before any Hub call: only a string that can be a Hub id
    (``name`` or ``namespace/name``) is looked up on the Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(spec).expanduser()
    if path.exists():
        return
    try:
        validate_repo_id(spec)
        local_parent = path.parent != Path(".") and path.parent.exists()  # e.g. models/m1 with models/ here
        hub_like = not (spec.startswith((".", "~")) or local_parent or path.suffix.lstrip(".") in _DATA_FILES)
    except HFValidationError:
        hub_like = False
    if not hub_like:
        raise ValueError(f"{what} {spec!r}: that local path does not exist ({path.resolve()}). Check the path.")


def load_data(spec: str, split: str, config: str | None = None) -> Any:
    from datasets import load_dataset, load_from_disk

    check_local(spec, "--dataset_name")
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data = load_from_disk(str(path))
        if hasattr(data, "keys") and split not in data:
            raise ValueError(
                f"{spec!r} is a saved DatasetDict with splits {list(data)} but no {split!r} split: pick one with "
                f"--dataset_train_split (e.g. --dataset_train_split {next(iter(data))})."
            )
        return data[split] if hasattr(data, "keys") else data
    suffix = path.suffix.lstrip(".")
    if path.is_file() and suffix in _DATA_FILES:
        if suffix != "parquet":
            from ..trainer.data import check_utf8_file

            check_utf8_file(path)
        return load_dataset("json" if suffix == "jsonl" else suffix, data_files=str(path), split="train")
    if path.is_file():
        raise ValueError(
            f"{spec!r}: a .{suffix or '<no suffix>'} file is not a dataset format trl-cream reads. Give a JSON/JSONL, "
            "CSV or Parquet file with a prompt column, a save_to_disk folder, or a Hub dataset id."
        )
    return load_dataset(spec, name=config, split=split)
