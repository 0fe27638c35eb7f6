"""The parsers of the `trl-cream` commands: TRL's `TrlParser` with CREAM's options grouped first in ``--help``,
configuration errors reported as parser errors (not tracebacks), and the ``trl_cream`` logger given a handler.

Imported only once a command runs: it imports TRL, transformers and torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from typing import Any

from transformers import TrainingArguments
from trl import TrlParser

from ..trainer.config import CreamConfig
from ..trainer.trl_base import OnlineDPOConfig

# CREAM's own options in `--help`, in this order; the inherited Trainer / online DPO fields come after them.
CREAM_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "CREAM: rounds",
        ("num_iterations", "learning_rate", "num_train_epochs", "warmup_steps", "save_round_artifacts",
         "freeze_gc", "sft_num_train_epochs", "sft_learning_rate", "sft_max_length", "ddp_find_unused_parameters"),
    ),
    (
        "CREAM: sampling",
        ("num_generations", "temperature", "top_p", "max_new_tokens", "max_length", "generation_backend",
         "generation_batch_size", "scoring_batch_size", "long_prompts", "policy_logps_from_sampling",
         "vllm_max_model_length", "vllm_max_num_seqs", "vllm_enforce_eager"),
    ),
    (
        "CREAM: consistency and rewards",
        ("consistency_measure", "consistency_granularity", "round1_baseline", "reward_source", "baseline_source",
         "judge_max_new_tokens"),
    ),
    ("CREAM: loss", ("beta", "ref_policy", "loss_type")),
    (
        "CREAM: publishing to the Hub",
        ("push_to_hub", "hub_model_id", "hub_iteration_strategy", "hub_private_repo", "hub_token",
         "hub_push_failure", "hub_push_retries", "hub_push_backoff", "push_round_datasets", "push_merged_weights",
         "hub_base_model_id", "hub_card_results"),
    ),
    (
        "CREAM: output and resume",
        ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "save_strategy", "report_to", "run_name",
         "log_level", "log_completions", "num_completions_to_print", "log_unique_prompts"),
    ),
)  # fmt: skip

RESUME_HELP = (
    "Resume the CREAM run saved in output_dir: give it without a value (or `true`) to continue where the run "
    "stopped, reusing every finished phase (sampling, scoring, pairing, M<k>) and the last intra-round Trainer "
    "checkpoint; give a checkpoint folder (output_dir/rounds/round_<t>/trainer_checkpoints/checkpoint-<step>) to "
    "pick one; `false` starts afresh."
)


class CreamParser(TrlParser):
    """`TrlParser` whose configuration errors (a dataclass's ``__post_init__`` refusing a value or a missing
    companion option) end in ``prog: error: ...`` and exit status 2, like any other bad option."""

    def parse_args_and_config(self, args: list[str] | None = None, **kwargs: Any) -> Any:
        try:
            return super().parse_args_and_config(args, **kwargs)
        except (ValueError, FileNotFoundError, NotImplementedError) as error:
            self.error(str(error))


def cream_own_fields() -> list[str]:
    """The CreamConfig fields that CREAM adds or whose defaults it changes."""
    parent = {f.name: f for f in fields(OnlineDPOConfig)}
    return [
        f.name
        for f in fields(CreamConfig)
        if f.name not in parent or f.default != parent[f.name].default or f.metadata != parent[f.name].metadata
    ]


def build_parser(types: tuple[type, ...], prog: str, titles: dict[type, str] | None = None) -> CreamParser:
    """A `CreamParser` for ``types``; with `CreamConfig` among them, ``--help`` lists CREAM's groups first, then
    the other dataclasses (``titles`` names their groups), then the inherited Trainer / online DPO fields."""
    parser = CreamParser(types, prog=prog, usage=f"{prog} [--config FILE.yaml] [--option value ...]")
    if CreamConfig not in types:
        return parser
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = RESUME_HELP
    placed = {name for _, names in CREAM_GROUPS for name in names}
    groups = [*CREAM_GROUPS, ("CREAM: other", tuple(n for n in cream_own_fields() if n not in placed))]
    for cls, title in (titles or {}).items():
        groups.append((title, tuple(f.name for f in fields(cls))))
    _regroup(parser, groups, "inherited Trainer and online DPO options (TRL's meaning)")
    return parser


def _regroup(parser: argparse.ArgumentParser, groups: list[tuple[str, tuple[str, ...]]], rest: str) -> None:
    """Move each named option (and its ``--no_<name>`` twin) out of the flat option list into titled groups, shown
    in order before what is left."""
    optionals = parser._optionals
    general = parser.add_argument_group("general")
    new_groups = [general]
    for action in [a for a in optionals._group_actions if a.dest in ("help", "config")]:
        optionals._group_actions.remove(action)
        general._group_actions.append(action)
    for title, names in groups:
        group = parser.add_argument_group(title)
        for name in names:
            for action in [a for a in optionals._group_actions if a.dest == name]:
                optionals._group_actions.remove(action)
                group._group_actions.append(action)
        if group._group_actions:
            new_groups.append(group)
    optionals.title = rest
    parser._action_groups = [parser._positionals, *new_groups, optionals]


def setup_logging(args: TrainingArguments) -> None:
    """Give the ``trl_cream`` logger a handler on stderr: INFO on the main process unless ``--log_level`` says
    otherwise; ``--log_level_replica`` (default warning) on the other processes. ``args``: the command's
    `CreamConfig` (only its `TrainingArguments` logging fields are read)."""
    from transformers.training_args import trainer_log_levels

    name = args.log_level if args.should_log else args.log_level_replica
    level = logging.INFO if name == "passive" else trainer_log_levels[name]
    package = logging.getLogger("trl_cream")
    package.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        package.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the first call)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """The stream is always the current ``sys.stderr``."""
