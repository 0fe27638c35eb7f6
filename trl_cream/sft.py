"""Algorithm 1, line 2: the SFT stage M0 → M1 on the seed data, with TRL's SFTTrainer."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from .cream_config import CreamConfig

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


def sft_config(args: CreamConfig) -> SFTConfig:
    """The SFTConfig of the SFT stage: CREAM's `sft_*` fields plus the shared training settings."""
    shared = {name: getattr(args, name) for name in _SHARED_FIELDS}
    return SFTConfig(
        output_dir=str(Path(args.output_dir) / "sft"),
        num_train_epochs=args.sft_num_train_epochs,
        learning_rate=args.sft_learning_rate,
        max_length=args.sft_max_length,
        save_strategy="no",
        run_name=f"{args.run_name}-sft" if args.run_name else None,
        **shared,
    )


def run_sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    args: CreamConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``dataset`` (a PEFT model trains its active adapter). Returns the train metrics."""
    trainer = SFTTrainer(
        model=model, args=sft_config(args), train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )
    output = trainer.train()
    logger.info("SFT stage done: loss %.4f over %d steps", output.training_loss, output.global_step)
    return {"sft_loss": output.training_loss, "sft_steps": output.global_step, **output.metrics}
