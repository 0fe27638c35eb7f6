"""The run manifest (``output_dir/cream_state/manifest.json``): what identifies a CREAM run.

It records the configuration with every secret removed (``hub_token`` and any other token, password or key, by name
or by value), SHA-256 fingerprints of the prompt and SFT datasets, and the seeds. A resume whose manifest differs in a
compared field is refused, naming each differing field; fields that change no result (logging, saving, Hub
publishing, ``output_dir``) may differ.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from datasets import Dataset

MANIFEST_FORMAT = 1

# Fields that change neither the candidates, the scores, the pairs nor the weights: they may differ on resume.
NOT_COMPARED = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "run_name", "project",
        "trackio_space_id", "report_to", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
        "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "save_strategy",
        "save_steps", "save_total_limit", "save_only_model", "save_safetensors", "save_on_each_node",
        "save_round_artifacts", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo",
        "hub_always_push", "hub_revision", "hub_iteration_strategy", "hub_push_failure", "push_round_datasets",
        "hub_push_merged", "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
        "dataloader_pin_memory", "skip_memory_metrics", "include_num_input_tokens_seen", "ddp_timeout", "local_rank",
    }
)  # fmt: skip
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key|credentials?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(hf_|api_org_)[A-Za-z0-9]{16,}$")


def public_config(args: Any) -> dict[str, Any]:
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


def build_manifest(
    args: Any, prompts: Dataset, sft_dataset: Dataset | None, use_peft: bool, first_iteration: int
) -> dict[str, Any]:
    """What identifies a run: its config (secrets removed), dataset fingerprints and seeds."""
    return {
        "format": MANIFEST_FORMAT,
        "config": public_config(args),
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


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.field: old -> new`` for every compared field that differs."""
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if section == "config" and key in NOT_COMPARED:
                    continue
                if a.get(key, "<missing>") != b.get(key, "<missing>"):
                    diffs.append(f"{section}.{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs
