"""Algorithm 1, line 2: the SFT stage M0 → M1 on the seed data, with TRL's SFTTrainer.

The stage trains ``log π(y|x)``: only the answer is supervised, as in the paper and the authors' code.

- `prompt` + `completion` rows: TRL's completion-only loss (the prompt tokens get label -100).
- `messages` rows: TRL's `assistant_only_loss` when the chat template has (or TRL can add) ``{% generation %}``
  markers; otherwise (e.g. SmolLM2's ChatML template) each row becomes a prompt/completion pair, the prompt being
  every message before the last assistant turn and the completion that turn (earlier assistant turns are then
  context, not targets).
- `text` rows: plain language modelling on the whole text (there is no answer to tell apart).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template

from .config import CreamConfig
from .schedule import SFTStageConfig

logger = logging.getLogger(__name__)

# TrainingArguments that the SFT stage inherits from the CREAM config (hardware, precision, logging, batching).
_SHARED_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "use_cpu",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "report_to",
    "logging_steps",
    "seed",
    "disable_tqdm",
    "optim",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "deepspeed",
    "fsdp",
    "fsdp_config",
    "ddp_find_unused_parameters",
)


def supports_assistant_only_loss(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether TRL can mask a conversation to its assistant turns with this tokenizer's chat template (the template
    has ``{% generation %}`` markers, or TRL ships a training version of it)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def last_turn_as_completion(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Split a conversation into TRL's conversational prompt/completion form at its last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(
            "Every `messages` row of `sft_dataset` needs an assistant turn after at least one other message (the "
            f"answer to train on); got roles {[m.get('role') for m in messages]}."
        )
    return {"prompt": messages[:last], "completion": [messages[last]]}


def prepare_sft_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, dict[str, bool]]:
    """The dataset SFTTrainer sees, and the SFTConfig loss-masking flags that make it train on the answers only."""
    columns = dataset.column_names
    if "messages" in columns:
        if supports_assistant_only_loss(tokenizer):
            return dataset, {"assistant_only_loss": True}
        converted = dataset.map(
            lambda row: last_turn_as_completion(row["messages"]),
            remove_columns=[c for c in columns if c in ("messages", "prompt", "completion")],
            desc="SFT data: messages -> prompt/completion",
        )
        return converted, {"completion_only_loss": True}
    if "prompt" in columns and "completion" in columns:
        return dataset, {"completion_only_loss": True}
    return dataset, {"completion_only_loss": False}  # `text`: language modelling on the whole text


def sft_config(args: CreamConfig, report_to: str | list[str] | None = None, **loss_flags: bool) -> SFTConfig:
    """The SFTConfig of the SFT stage: CREAM's `sft_*` fields plus the shared training settings (`report_to` too,
    unless given: the CREAM trainer passes ``"none"`` and forwards the stage's logs into its own run)."""
    shared = {name: getattr(args, name) for name in _SHARED_FIELDS}
    if report_to is not None:
        shared["report_to"] = report_to
    return SFTStageConfig(
        output_dir=str(Path(args.output_dir) / "sft"),
        num_train_epochs=args.sft_num_train_epochs,
        learning_rate=args.sft_learning_rate,
        max_length=args.sft_max_length,
        save_strategy="no",
        run_name=f"{args.run_name}-sft" if args.run_name else None,
        **loss_flags,
        **shared,
    )


def build_sft_trainer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    args: CreamConfig,
    callbacks: list[TrainerCallback] | None = None,
    report_to: str | list[str] | None = None,
) -> SFTTrainer:
    """TRL's SFTTrainer for the SFT stage, set up to supervise the answers only (see the module docstring)."""
    dataset, loss_flags = prepare_sft_dataset(dataset, tokenizer)
    return SFTTrainer(
        model=model,
        args=sft_config(args, report_to, **loss_flags),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def run_sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    args: CreamConfig,
    callbacks: list[TrainerCallback] | None = None,
    report_to: str | list[str] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``dataset`` (a PEFT model trains its active adapter). Returns the train metrics."""
    trainer = build_sft_trainer(model, tokenizer, dataset, args, callbacks, report_to)
    output = trainer.train()
    trainer.accelerator.free_memory()  # DeepSpeed: destroy the SFT engine (its optimizer state, ZeRO-3 hooks)
    logger.info("SFT stage done: loss %.4f over %d steps", output.training_loss, output.global_step)
    return {"sft_loss": output.training_loss, "sft_steps": output.global_step, **output.metrics}
