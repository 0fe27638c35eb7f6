"""Helpers of [`trl_cream.hub`]: retries with backoff, token redaction, the up-front checks of the hub fields, and
the file sets that go up (an iteration's files, merged LoRA weights, a round's datasets as parquet)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from ..runs.layout import iteration_index, iteration_name

logger = logging.getLogger("trl_cream.hub")

STRATEGIES: tuple[str, ...] = ("branch", "repo")
FAILURE_MODES: tuple[str, ...] = ("raise", "warn")
NOT_UPLOADED = ("training_args.bin",)  # a pickle of the training arguments: never published
MERGED_SUBFOLDER = "merged"
# Transient HTTP statuses worth retrying; any other 4xx (401 bad token, 403 no write access, 404, 409...) is
# permanent and fails at once.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

T = TypeVar("T")


# ---------------------------------------------------------------- retries
def redact(text: str, token: str | None) -> str:
    """``text`` with ``token`` replaced by ``***``."""
    return text.replace(token, "***") if token else text


def status_of(error: BaseException) -> int | None:
    """The HTTP status of a failed Hub call, ``None`` for a network or local error."""
    return getattr(getattr(error, "response", None), "status_code", None)


def describe(error: BaseException) -> str:
    """One line: ``HTTP <status>, <type>: <message>``."""
    status = status_of(error)
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"HTTP {status}, {text}" if status is not None else text


def local_cause(error: BaseException | None = None) -> str | None:
    """Why the Hub cannot be used at all from this machine (offline mode, no token), or `None`: such a cause is
    never retried and is named in the error message."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE or isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set: the Hub is not contacted (unset HF_HUB_OFFLINE to push)"
    if isinstance(error, LocalTokenNotFoundError):
        return "no token: run hf auth login or set HF_TOKEN (or pass hub_token)"
    return None


def require_token(token: str | None) -> None:
    """No token at all (no `hub_token`, HF_TOKEN or `hf auth login`): fail before any call, so that nothing is
    retried and the message names the missing token rather than the network error a tokenless call gets."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import LocalTokenNotFoundError

    if not token and get_token() is None:
        raise LocalTokenNotFoundError("no token")


def is_retryable(error: BaseException) -> bool:
    """Network errors, timeouts, 408/429 and 5xx are retried; other HTTP errors, offline mode and a missing token
    are not."""
    if local_cause(error) is not None:
        return False
    status = status_of(error)
    return status is None or status in RETRYABLE_STATUS


@dataclass
class RetryPolicy:
    """Retry a Hub call ``retries`` times after the first try, waiting ``base_delay * 2**i`` seconds before retry
    ``i`` (exponential backoff)."""

    retries: int = 3
    base_delay: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delays(self) -> list[float]:
        return [self.base_delay * 2**i for i in range(self.retries)]


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy, token: str | None = None) -> T:
    """Run ``fn``; retry a transient error ([`is_retryable`]) with backoff. A permanent error, or the last transient
    one once the retries are spent, is re-raised."""
    delays = policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as error:
            if attempt == len(delays) or not is_retryable(error):
                raise
            logger.warning(
                "Hub: %s failed (attempt %d/%d: %s); retrying in %.1f s.",
                what, attempt + 1, len(delays) + 1, redact(describe(error), token), delays[attempt],
            )  # fmt: skip
            policy.sleep(delays[attempt])
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- config checks
@runtime_checkable
class HubArgs(Protocol):
    """The config fields the hub layer reads (the checks below, [`HubSettings.from_args`], [`CardSettings.from_args`],
    [`start`]), typed as `CreamConfig` declares them; `CreamConfig` satisfies it structurally."""

    output_dir: str | None
    num_iterations: int
    save_round_artifacts: bool
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    hub_private_repo: bool | None
    hub_iteration_strategy: str
    hub_push_failure: str
    hub_push_retries: int
    hub_push_backoff: float
    push_round_datasets: bool
    push_merged_weights: bool
    hub_base_model_id: str | None
    hub_card_results: str | None


def validate_settings(args: HubArgs) -> None:
    """The up-front checks of the hub fields of a `CreamConfig` (no network)."""
    if args.hub_iteration_strategy not in STRATEGIES:
        raise ValueError(
            f"hub_iteration_strategy={args.hub_iteration_strategy!r} is unknown; choose one of "
            f"{', '.join(STRATEGIES)}."
        )
    if args.hub_push_failure not in FAILURE_MODES:
        raise ValueError(
            f"hub_push_failure={args.hub_push_failure!r} is unknown; choose one of {', '.join(FAILURE_MODES)}."
        )
    if args.hub_push_retries < 0 or args.hub_push_backoff < 0:
        raise ValueError(
            f"hub_push_retries={args.hub_push_retries} and hub_push_backoff={args.hub_push_backoff} must be >= 0."
        )
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError(
            "push_to_hub=True needs hub_model_id (e.g. 'your-name/cream-llama3'): CREAM pushes every iteration to "
            "it, one branch per iteration (hub_iteration_strategy='branch') or one repo each ('repo'). Pass "
            "--hub_model_id your-name/cream-llama3, or drop --push_to_hub."
        )
    if args.hub_model_id:
        check_repo_ids(args)
    if args.hub_card_results and not Path(args.hub_card_results).is_file():
        raise FileNotFoundError(
            f"hub_card_results={args.hub_card_results!r} is not a file; give the results.json written by "
            "`trl-cream eval`, or leave hub_card_results unset."
        )
    if args.push_to_hub and args.push_round_datasets and not args.save_round_artifacts:
        raise ValueError(
            "push_round_datasets=True pushes the saved round artifacts, but save_round_artifacts=False; set "
            "save_round_artifacts=True or push_round_datasets=False."
        )


def check_repo_ids(args: HubArgs) -> None:
    """`hub_model_id` and every repo id derived from it (``-M<k>`` repos, ``-rounds``), by huggingface_hub's own
    validator, so that a bad id fails when the config is built, not after a round has trained."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    ids = [args.hub_model_id]
    if args.hub_iteration_strategy == "repo":  # the longest derived id: the last iteration's repo
        ids.append(iteration_target(args.hub_model_id, "repo", iteration_index(args.num_iterations + 1))[0])
    if args.push_round_datasets:
        ids.append(f"{args.hub_model_id}-rounds")
    for repo_id in ids:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(
                f"hub_model_id={args.hub_model_id!r} is not a valid Hub repo id ({repo_id!r}: {error}) Use "
                "'<user or org>/<name>' with letters, digits, '-', '_' or '.', at most 96 characters in all."
            ) from None
    if args.push_to_hub and "/" not in args.hub_model_id:
        raise ValueError(
            f"hub_model_id={args.hub_model_id!r} has no namespace: the branches, per-iteration repos and rounds "
            f"dataset are addressed by '<user or org>/<name>', and without one the first push fails after M1 and M2 "
            f"are trained. Use e.g. 'your-name/{args.hub_model_id}'."
        )


# ---------------------------------------------------------------- names
def iteration_target(hub_model_id: str, strategy: str, index: int) -> tuple[str, str]:
    """``(repo_id, revision)`` holding ``M<index>``."""
    if strategy == "branch":
        return hub_model_id, iteration_name(index)
    if strategy == "repo":
        return f"{hub_model_id}-{iteration_name(index)}", "main"
    raise ValueError(f"hub_iteration_strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}.")


# ---------------------------------------------------------------- what goes up
def iteration_files(
    folder: Path, staging: Path, base_model_id: str | None = None, merged: bool = False
) -> dict[str, Path]:
    """``path_in_repo → local file`` of ``M<k>``: every file but ``training_args.bin`` and hidden files; an
    adapter's ``base_model_name_or_path`` set to ``base_model_id`` when given; with ``merged``, the merged weights
    under ``merged/``. What is not in ``folder`` as it goes up (the edited adapter config, the merged weights) is
    written under ``staging``, an empty folder the caller removes after the upload: every file is uploaded from disk,
    none is held in memory. ``folder`` itself is only read."""
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not a saved CREAM iteration (no README.md model card).")
    files: dict[str, Path] = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in NOT_UPLOADED and not p.name.startswith(".")
    }
    if "adapter_config.json" in files and base_model_id:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model_id
        files["adapter_config.json"] = staging / "adapter_config.json"
        files["adapter_config.json"].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if "adapter_config.json" in files and merged:
        for path in save_merged_weights(folder, staging / MERGED_SUBFOLDER):
            files[f"{MERGED_SUBFOLDER}/{path.name}"] = path
    return files


def save_merged_weights(folder: Path, out: Path) -> list[Path]:
    """Save the adapter in ``folder`` merged into its base model (``base_model_name_or_path``) with
    `save_pretrained` into ``out``; returns the files written. Loads one extra model copy on the CPU."""
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder), device_map="cpu")
    model.merge_and_unload().save_pretrained(out)
    return sorted(p for p in out.iterdir() if p.is_file())


def round_files(round_dir: Path, staging: Path) -> dict[str, Path]:
    """A round's ``candidates``/``pairs`` as ``round_<t>/<name>.parquet`` (written under ``staging``, which the
    caller removes after the upload) and its ``round_<t>/metrics.json``."""
    from datasets import load_from_disk

    files: dict[str, Path] = {}
    for name in ("candidates", "pairs"):
        if (round_dir / name).is_dir():
            parquet = staging / f"{round_dir.name}-{name}.parquet"
            load_from_disk(str(round_dir / name)).to_parquet(str(parquet))
            files[f"{round_dir.name}/{name}.parquet"] = parquet
    if (round_dir / "metrics.json").is_file():
        files[f"{round_dir.name}/metrics.json"] = round_dir / "metrics.json"
    if not files:
        raise FileNotFoundError(f"push_round_datasets=True but {round_dir} holds no round artifacts.")
    return files
