"""The run manifest (``output_dir/cream_state/manifest.json``): what identifies a CREAM run.

It records the configuration with every secret removed (``hub_token`` and any other token, password or key, by name
or by value), SHA-256 fingerprints of the prompt and SFT datasets, and the seeds. A resume whose manifest differs in a
compared field is refused, naming each differing field; fields that change no result (logging, saving, Hub
publishing, ``output_dir``) may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Protocol, runtime_checkable

import torch
from datasets import Dataset

MANIFEST_FORMAT = 1

# Fields inherited from transformers/TRL that change neither the candidates, the scores, the pairs nor the weights:
# they may differ on resume. CreamConfig lists its own such fields in ``CreamConfig.resume_free_fields``; both lists
# are checked against the config's fields (`not_compared_fields`), so a name cannot drift from the fields.
INHERITED_NOT_COMPARED = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "run_name", "project", "trackio_space_id",
        "report_to", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node", "logging_strategy",
        "logging_steps", "logging_first_step", "logging_nan_inf_filter", "save_strategy", "save_steps",
        "save_total_limit", "save_only_model", "save_on_each_node", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_prefetch_factor",
        "dataloader_persistent_workers", "dataloader_pin_memory", "skip_memory_metrics",
        "include_num_input_tokens_seen", "ddp_timeout", "local_rank",
    }
)  # fmt: skip
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key|credentials?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(hf_|api_org_)[A-Za-z0-9]{16,}$")


def not_compared_fields(config_cls: type) -> frozenset[str]:
    """The config fields that may differ on resume: the config class's own ``resume_free_fields`` and
    `INHERITED_NOT_COMPARED`. (A class attribute rather than field metadata: `HfArgumentParser` hands every metadata
    key to ``argparse.add_argument``, which refuses unknown ones.)

    Raises:
        ValueError: a listed name is not a field of ``config_cls`` (the list drifted from the fields).
    """
    listed = INHERITED_NOT_COMPARED | frozenset(getattr(config_cls, "resume_free_fields", frozenset()))
    unknown = sorted(listed - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ValueError(f"Fields listed as not compared on resume {unknown} are not fields of {config_cls.__name__}.")
    return listed


@runtime_checkable
class RunArgs(Protocol):
    """What the manifest reads of the config: all of it as a dict (`TrainingArguments.to_dict`), the seeds and the
    number of rounds (`CreamConfig` satisfies it structurally)."""

    seed: int
    data_seed: int | None
    num_iterations: int

    def to_dict(self) -> dict[str, Any]: ...


def public_config(args: RunArgs) -> dict[str, Any]:
    """The configuration as JSON-ready values, without any token, password or secret (key or value)."""
    config = json.loads(json.dumps(args.to_dict(), default=str))
    return {
        k: v
        for k, v in config.items()
        if not _SECRET_KEY.search(k) and not (isinstance(v, str) and _SECRET_VALUE.match(v))
    }


def dataset_fingerprint(dataset: Dataset | None, columns: list[str] | None = None) -> str | None:
    """A SHA-256 of the dataset's rows (the given columns), independent of how the dataset was built or cached."""
    if dataset is None:
        return None
    columns = columns or list(dataset.column_names)
    digest = hashlib.sha256(json.dumps(columns).encode())
    digest.update(str(len(dataset)).encode())
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- model and tokenizer identity
ROLES = {"policy": "the policy (`model`)", "initial": "π_0 (`ref_model`)", "tokenizer": "the tokenizer"}
INFORMATIONAL = ("name_or_path",)  # recorded and shown, never compared (a moved folder is the same model)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, skip: str | None = None, samples: int = 64) -> str:
    """A cheap SHA-256 of the weights: every tensor's name, shape and dtype and ``samples`` evenly spaced values.

    Two loads of the same checkpoint give the same fingerprint; any retrained, re-initialised or other model almost
    surely does not. Partitioned (ZeRO-3) tensors contribute their full shape only.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if skip and skip in name:
                continue
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
            digest.update(f"{name}:{shape}:{tensor.dtype};".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0 or flat.device.type == "meta":
                continue
            step = max(1, flat.numel() // samples)
            digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: Any, skip: str | None = None) -> dict[str, Any]:
    """Name or path, a hash of the architecture config, a weights fingerprint and the vocabulary size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") and skip else model
    config = getattr(base, "config", None)
    config_dict = config.to_dict() if config is not None else {}
    for key in ("_name_or_path", "transformers_version", "architectures", "use_cache"):
        config_dict.pop(key, None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": getattr(config, "model_type", None),
        "config_sha256": _sha(json.dumps(config_dict, sort_keys=True, default=str).encode()),
        "weights_sha256": weights_fingerprint(base, skip),
        "vocab_size": int(getattr(embeddings, "num_embeddings", 0) or 0) if embeddings is not None else None,
    }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", "") or "",
        "size": len(tokenizer),
        "vocab_sha256": _sha(json.dumps(sorted(vocab.items())).encode()),
        "special_tokens": {k: str(v) for k, v in sorted((tokenizer.special_tokens_map or {}).items())},
        "chat_template_sha256": _sha(str(getattr(tokenizer, "chat_template", None)).encode()),
    }


def run_identity(model: Any, ref_model: Any | None, tokenizer: Any, peft: bool) -> dict[str, Any]:
    """The ``models`` section of the manifest: the policy as given, π_0 (the ref model, or with LoRA the base
    without adapters, or with an SFT stage the model before it) and the tokenizer."""
    if ref_model is not None:
        initial = model_identity(ref_model)
    elif peft and hasattr(model, "get_base_model"):
        initial = model_identity(model, skip="lora_")
    else:
        initial = model_identity(model)
    return {"policy": model_identity(model), "initial": initial, "tokenizer": tokenizer_identity(tokenizer)}


# ---------------------------------------------------------------- the manifest
def build_manifest(
    args: RunArgs,
    prompts: Dataset,
    sft_dataset: Dataset | None,
    use_peft: bool,
    first_iteration: int,
    models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies a run: its config (secrets removed; ``settings`` holds the fields that may differ on resume),
    the model, π_0 and tokenizer identities, dataset fingerprints and seeds."""
    config = public_config(args)
    free = not_compared_fields(type(args))
    manifest = {
        "format": MANIFEST_FORMAT,
        "config": {k: v for k, v in config.items() if k not in free},
        "settings": {k: v for k, v in config.items() if k in free},
        "datasets": {
            "prompts": dataset_fingerprint(prompts, ["prompt"]),
            "prompts_rows": len(prompts),
            "sft": dataset_fingerprint(sft_dataset),
        },
        "seeds": {
            "seed": args.seed,
            "data_seed": args.data_seed,
            "rounds": {str(t): args.seed + t for t in range(1, args.num_iterations + 1)},
        },
        "policy": {"peft": use_peft, "first_iteration": first_iteration},
    }
    if models is not None:
        manifest["models"] = models
    return manifest


def _model_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for role, label in ROLES.items():
        a, b = old.get(role) or {}, new.get(role) or {}
        changed = [k for k in sorted(set(a) | set(b)) if k not in INFORMATIONAL and a.get(k) != b.get(k)]
        if changed:
            what = ", ".join(f"{k} {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}" for k in changed)
            where = (
                f" (was {a.get('name_or_path') or '<in memory>'!r}, now {b.get('name_or_path') or '<in memory>'!r})"
            )
            diffs.append(f"models.{role}: {label} differs: {what}{where}")
    return diffs


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.field: old -> new`` for every compared field that differs. The config fields under ``settings`` in
    either manifest are not compared; a manifest written before models were recorded is not compared on them."""
    free = set(old.get("settings") or {}) | set(new.get("settings") or {})
    diffs = []
    for section in sorted((set(old) | set(new)) - {"settings"}):
        a, b = old.get(section), new.get(section)
        if section == "world" and (a is None or b is None):
            continue  # a run recorded before the process count was
        if section == "models":
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += _model_differences(a, b)
        elif isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if section == "config" and key in free:
                    continue
                if a.get(key, "<missing>") != b.get(key, "<missing>"):
                    diffs.append(f"{section}.{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs
