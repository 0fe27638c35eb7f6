"""Everything trl-cream takes from TRL's experimental `OnlineDPOTrainer`, in one place.

`OnlineDPOTrainer` lives in `trl.experimental`, which carries no stability guarantee ("promote or remove, no
deprecation cycle"). This module is the only one that imports `trl.experimental` (ruff's TID251 refuses the import
anywhere else; see pyproject.toml), and it silences TRL's notice for that import only. CREAM runs its own rounds
(sampling N candidates, scoring, pairing) and uses the parent only for what a TRL trainer gives every subclass: the
constructor (model/PEFT/reference set-up, accelerator, callbacks), `Trainer.train` on a pairs dataset, logging and
model cards. What it relies on, and nothing else:

- ``__init__(model, ref_model, reward_funcs, args, train_dataset, processing_class, peft_config, callbacks,
  optimizers)``: building the trainer, with ``reward_funcs=[]``; given a `PeftModel` and no reference it would
  deep-copy the model as π_0, hence the `_AdapterReference` placeholder; a full reference is kept as given (eval
  mode, placed by the accelerator);
- ``self.ref_model``: π_0 for full fine-tuning (`None` with PEFT: π_0 is the adapter-free base);
- ``self._tokenizer``: the tokenizer behind ``processing_class`` ([`TrlOnlineDPOBase.tokenizer`]);
- ``self.eos_token_ids``: every id that ends a completion ([`TrlOnlineDPOBase.eos_ids`]);
- ``self.stats``: the parent averages each of its lists into every training log; CREAM empties it and logs its own
  per-step metrics as TRL's stable `DPOTrainer` does (`record_metrics` into ``_metrics``, averaged in `log`);
- ``_save_checkpoint``: intra-round checkpoints; `create_model_card` writes no card in ``output_dir`` itself;
- ``beta``, a property: replaced, since the parent indexes a β list by a float epoch;
- ``training_step``: replaced by `transformers.Trainer.training_step`.

`tests/test_trl_contract.py` checks each of them, names and behaviour, so that a TRL release that changes one fails
there with a clear message; moving to another base (`trl.DPOTrainer`, or `transformers.Trainer`: see
docs/architecture.md) means changing this module only.
"""

from __future__ import annotations

import gc
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model, set_seed
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl.import_utils import TRLExperimentalWarning

from .. import engines
from ..modeling.perf import frozen_gc
from . import run_log

# The only import of `trl.experimental` in trl-cream (ruff's TID251 refuses it anywhere else). Its notice that the API
# is unstable is silenced here, for this import only: the user's process environment is left alone.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

# The parent's constructor parameters CreamTrainer passes (the contract test checks they still exist).
PARENT_INIT_PARAMETERS: tuple[str, ...] = (
    "model",
    "ref_model",
    "reward_funcs",
    "args",
    "train_dataset",
    "processing_class",
    "peft_config",
    "callbacks",
    "optimizers",
)
# Attributes the parent's constructor sets and CREAM reads.
PARENT_ATTRIBUTES: tuple[str, ...] = ("ref_model", "_tokenizer", "eos_token_ids", "stats")
# Methods of the parent (and of transformers' Trainer below it) that CREAM calls through super() or replaces, with
# the parameters it passes or receives.
PARENT_METHODS: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_push_from_checkpoint": ("checkpoint_folder",),
    "training_step": ("model", "inputs", "num_items_in_batch"),
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "log": ("logs", "start_time"),
    "init_hf_repo": ("token", "private"),
    "create_model_card": ("model_name", "dataset_name", "tags"),
    "save_model": ("output_dir", "_internal_call"),
    "train": ("resume_from_checkpoint",),
}
# Fields of the parent's config that CREAM reads (the others are refused when set, see CreamConfig).
PARENT_CONFIG_FIELDS: tuple[str, ...] = (
    "beta",
    "loss_type",
    "max_new_tokens",
    "max_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "ds3_gather_for_generation",
    "use_vllm",
    "vllm_gpu_memory_utilization",  # the vLLM backend's (trl_cream.trainer.vllm_engine)
    "vllm_tensor_parallel_size",
    "vllm_enable_sleep_mode",
    "disable_dropout",
    "trust_remote_code",
)

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer", "TrlOnlineDPOBase"]


class _AdapterReference(nn.Module):
    """Placeholder reference handed to the parent so that it does not deep-copy a PEFT model: π_0 is the base model
    with adapters disabled. Removed right after the parent's ``__init__``."""


class TrlOnlineDPOBase(OnlineDPOTrainer):
    """`OnlineDPOTrainer` as CREAM uses it: built without reward functions, trained on a fixed pairs dataset per
    round (`train_on_pairs`), with steps counted across rounds in the logs. Holds every override of the parent."""

    loss_is_scaled_for_ga = False  # Trainer.training_step divides our per-batch mean loss by the GA steps

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        ref_model: PreTrainedModel | nn.Module | None,
        args: OnlineDPOConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase | None,
        peft_config: Any | None,
        callbacks: list[TrainerCallback] | None,
        optimizers: tuple[Any, Any],
    ) -> None:
        placeholder = is_peft_model(model) and ref_model is None
        super().__init__(
            model=model,
            ref_model=_AdapterReference() if placeholder else ref_model,
            reward_funcs=[],
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if placeholder:
            self.ref_model = None
        self.stats = {}  # the parent averages this dict into each training log: empty, it adds nothing
        self._metrics: dict[str, list[float]] = defaultdict(list)  # per-step metrics, averaged into each log (log())
        self._round = 0  # the round being run (0 before the first), shown as cream/round in every log
        self._steps = run_log.StepAxis()  # one step axis across the SFT stage and every round
        self._round_output_dir: str | None = None  # where the current round's Trainer checkpoints go
        run_log.attach(self.callback_handler, args.output_dir)  # one logging run for SFT + every round

    # ---------------------------------------------------------------- what CREAM reads from the parent
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer behind ``processing_class`` (the parent's ``_tokenizer``)."""
        return self._tokenizer

    @property
    def eos_ids(self) -> Sequence[int]:
        """Every token id that ends a completion: the tokenizer's eos and the model's own (the parent's
        ``eos_token_ids``)."""
        return self.eos_token_ids

    @property
    def beta(self) -> float:
        """β of the current round (the parent indexes a β list by a float epoch, which crashes)."""
        return self.args.beta_for_round(max(self._round, 1))

    # ---------------------------------------------------------------- the run's rounds and steps
    @property
    def round(self) -> int:
        """The round being run (0 before the first), set by [`start_round`]."""
        return self._round

    @property
    def run_steps(self) -> int:
        """Optimizer steps of the finished stages (the SFT stage and the rounds) of this run."""
        return self._steps.offset

    def start_round(self, t: int) -> int:
        """Round ``t`` starts: its β, its ``cream/round`` in every log; returns the run step of the round's own
        metrics (its first optimizer step)."""
        self._round = t
        return self._steps.round_start()

    def count_steps(self, steps: int) -> None:
        """A stage that ran ``steps`` optimizer steps outside `train_on_pairs` (the SFT stage, the finished rounds
        of a resumed run)."""
        self._steps.finish_stage(steps)

    def end_logging_run(self) -> None:
        """The run is over: the logging integrations' end-of-training hooks, held back at each round's end, run."""
        run_log.end_run(self.callback_handler, self.args, self.state, self.control, model=self.model)

    # ---------------------------------------------------------------- parent fixes
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Transformers' standard step (loss / GA steps, then backward) around our `compute_loss`, instead of the
        parent's step, which samples 2 completions inline and back-propagates an unscaled loss."""
        return Trainer.training_step(self, model, inputs, num_items_in_batch)

    # ---------------------------------------------------------------- metrics and logs (as TRL's DPOTrainer)
    def record_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Store one training step's metrics (each gathered across processes and averaged); the next log averages
        every value stored since the previous one."""
        for key, value in metrics.items():
            self._metrics[key].append(self.accelerator.gather_for_metrics(value.detach().float()).mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log with the stored metrics' means, at the run's step (`trl_cream.trainer.run_log`), so that report_to
        integrations see one ordered run."""
        metrics = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
        self._metrics.clear()
        with self._steps.applied(self.state):
            super().log({**logs, **metrics, "cream/round": self._round}, start_time)

    @contextmanager
    def at_run_step(self, step: int) -> Iterator[None]:
        """``state.global_step`` is the run's step ``step`` for the block (an integration called directly, e.g. with a
        round's completions table)."""
        with self._steps.pinned(step), self._steps.applied(self.state):
            yield

    def log_at(self, logs: dict[str, float], step: int) -> None:
        """Log at the run's step ``step`` (a round's own metrics, the SFT stage's logs)."""
        with self._steps.pinned(step):
            self.log(logs)

    # The Trainer must not create repos or push on its own: CREAM pushes every iteration itself (trl_cream.hub).
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repo at init: CREAM creates the iteration repos/branches when it pushes."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=True)  # save, never push

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intra-round checkpoints are not pushed."""

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """No card in ``output_dir`` itself (TRL writes one at every intra-round checkpoint): the user's own
        ``output_dir/README.md`` is never replaced. CREAM writes each iteration's card in ``M<k>/`` (`trl_cream.hub`).
        """

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """An intra-round Trainer checkpoint, without the pickled ``training_args.bin`` (a resume never reads it).

        What is left is safetensors, JSON and the optimizer/scheduler/RNG states, which transformers loads with
        ``torch.load(weights_only=True)``."""
        super()._save_checkpoint(model, trial)
        if self.accelerator.is_main_process:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)

    def _get_output_dir(self, trial: Any) -> str:
        """Intra-round Trainer checkpoints go to ``rounds/round_<t>/trainer_checkpoints``."""
        return self._round_output_dir or super()._get_output_dir(trial)

    # ---------------------------------------------------------------- one round of DPO training
    def train_on_pairs(
        self, pairs: Dataset, output_dir: Path | None = None, resume_from: Path | None = None, seed: int | None = None
    ) -> TrainOutput:
        """`Trainer.train` on a round's pairs, with a fresh optimizer and warm-up; the run's log history is kept.

        Args:
            pairs: the round's preference pairs (non-empty).
            output_dir: where intra-round Trainer checkpoints go (``save_strategy``).
            resume_from: an intra-round checkpoint to continue from.
            seed: set before training, so that data order and dropout do not depend on what ran before.
        """
        if seed is not None:
            set_seed(seed)  # the same data order and dropout whether or not sampling ran in this process
        self.train_dataset = pairs
        self.optimizer, self.lr_scheduler = None, None  # fresh AdamW and warm-up every round
        self._metrics.clear()
        history = self.state.log_history  # Trainer.train starts a fresh state; keep the whole run's history
        self._round_output_dir = str(output_dir) if output_dir is not None else None
        with frozen_gc(self.args.freeze_gc):
            try:
                output = super().train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            finally:
                self._round_output_dir = None
            self.state.log_history = history + self.state.log_history
            self._steps.finish_stage(self.state.global_step)
            self.optimizer, self.lr_scheduler = None, None  # free AdamW's state before the next round's scoring
            if engines.release_engine(self.accelerator):  # DeepSpeed: the next round builds a fresh engine
                self.model_wrapped, self.deepspeed = self.model, None
            gc.collect()
        return output
