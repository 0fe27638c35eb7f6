"""CreamTrainer: TRL's online DPO trainer, run as CREAM rounds (Algorithm 1)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model, set_seed
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput
from trl.experimental.online_dpo import OnlineDPOTrainer

from .. import distributed, engines, hub
from ..core.loss import cream_dpo_loss
from ..modeling import reward_sources
from ..modeling.perf import frozen_gc
from ..modeling.sampling import completion_logps, tokenize_prompts
from ..runs.store import PhaseStore
from .config import CreamConfig
from .data import PairCollator, split_equally, validate_prompts, validate_sft_dataset
from .phases import RoundPhasesMixin
from .resume import ResumableRoundsMixin
from .sft import run_sft
from .validation import (
    check_distinct_from_initial,
    check_model_inputs,
    check_tokenizer,
    fit_prompts,
)

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{wang2025cream,
    title        = {{CREAM: Consistency Regularized Self-Rewarding Language Models}},
    author       = {Zhaoyang Wang and Weilei He and Zhiyuan Liang and Xuchao Zhang and Chetan Bansal and Ying Wei
                    and Weitong Zhang and Huaxiu Yao},
    year         = 2025,
    booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
}"""


class _AdapterReference(nn.Module):
    """Placeholder reference handed to the parent so that it does not deep-copy a PEFT model: π_0 is the base model
    with adapters disabled. Removed right after the parent's ``__init__``."""


class CreamTrainer(ResumableRoundsMixin, RoundPhasesMixin, OnlineDPOTrainer):
    """Consistency Regularized sElf-rewarding lAnguage Models (CREAM), on top of TRL's online DPO trainer.

    ``train()`` runs ``args.num_iterations`` rounds ``M_t → M_{t+1}``; each round samples, scores, pairs, trains and
    saves ``output_dir/M<t+1>``. The starting policy is saved as ``output_dir/M<first>`` too.

    Args:
        model (`PreTrainedModel` or `PeftModel`): the round-1 policy M1 (after SFT). With PEFT, either a
            `PeftModel` whose active adapter is M1 (π_0 is then the base with adapters disabled), or the base model
            plus `peft_config`.
        ref_model (`PreTrainedModel`, *optional*): the initial model π_0 = M0 for full fine-tuning. Leave `None`
            with PEFT.
        args ([`CreamConfig`]): the configuration.
        train_dataset (`datasets.Dataset`): prompt-only dataset with a `prompt` column (strings or chat messages).
        processing_class (`PreTrainedTokenizerBase`): the tokenizer.
        peft_config (`peft.PeftConfig`, *optional*): a LoRA config to wrap a base model with.
        callbacks, optimizers: as in [`~transformers.Trainer`]; a fresh optimizer is created for every round.
        reward_model (`PreTrainedModel` or callable, *optional*): a sequence-classification reward model (one
            label) or a TRL-style reward function, for `reward_source="reward_model"` (the Oracle baseline) or
            `baseline_source="reward_model"`; with `reward_processing_class`, its tokenizer.
        judge_model (`PreTrainedModel`, *optional*): the LLM-as-a-judge for `reward_source="judge"` (default: the
            policy itself); with `judge_processing_class` (default: the policy's tokenizer).
    """

    _tag_names = ["trl", "cream", "online-dpo", "self-rewarding"]
    _name = "CREAM"
    _paper = {
        "title": "CREAM: Consistency Regularized Self-Rewarding Language Models",
        "id": "2410.12735",
        "citation": _CITATION,
    }
    loss_is_scaled_for_ga = False  # Trainer.training_step divides our per-batch mean loss by the GA steps

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        ref_model: PreTrainedModel | nn.Module | None = None,
        args: CreamConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        sft_dataset: Dataset | None = None,
        reward_model: PreTrainedModel | nn.Module | reward_sources.RewardFunction | None = None,
        reward_processing_class: PreTrainedTokenizerBase | None = None,
        judge_model: PreTrainedModel | nn.Module | None = None,
        judge_processing_class: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if not isinstance(args, CreamConfig):
            raise TypeError(f"`args` must be a CreamConfig, got {type(args).__name__}.")
        reward_sources.check_reward_setup(args.reward_source, args.baseline_source, reward_model, judge_model)
        validate_prompts(train_dataset, args.num_iterations)
        check_model_inputs(model, peft_config)
        check_tokenizer(processing_class, train_dataset["prompt"])
        if processing_class is not None:
            fit_prompts(
                tokenize_prompts(processing_class, train_dataset["prompt"]), args.max_length, args.max_new_tokens,
                args.long_prompts, "the prompts of train_dataset",
            )  # fmt: skip
        if sft_dataset is not None:
            validate_sft_dataset(sft_dataset)
            if ref_model is not None:
                raise ValueError(
                    "With `sft_dataset`, `model` is M0 and π_0 is taken from it before the SFT stage: leave "
                    "`ref_model=None`."
                )
            ref_model = engines.initial_reference(model, is_peft_model(model) or peft_config is not None)  # ZeRO-3
        else:
            use_peft = is_peft_model(model) or peft_config is not None
            if not use_peft and ref_model is None:
                raise ValueError(
                    "Full fine-tuning needs the initial model π_0 (M0) as `ref_model`: CREAM's rewards are "
                    "log π_t − log π_0. Pass ref_model=M0, pass `sft_dataset` to run the SFT stage from M0, or "
                    "train LoRA adapters (π_0 is then the adapter-free base)."
                )
            check_distinct_from_initial(model, ref_model, peft_config)
        self._peft_placeholder = is_peft_model(model) and ref_model is None
        super().__init__(
            model=model,
            ref_model=_AdapterReference() if self._peft_placeholder else ref_model,
            reward_funcs=[],
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if self._peft_placeholder:
            self.ref_model = None
        distributed.setup(self.accelerator, args, is_peft_model(self.model))
        self.args: CreamConfig
        self.use_peft = is_peft_model(self.model)
        self.data_collator = PairCollator(self._tokenizer.pad_token_id, args.max_length)
        self.stats: dict[str, list[float]] = {}
        self.prompts = train_dataset
        self.round = 0
        self.round_metrics: list[dict[str, Any]] = []
        self.sft_dataset = sft_dataset
        self.sft_metrics: dict[str, float] = {}
        self._step_offset = 0
        self._round_output_dir: str | None = None
        self._resumed_round = 0
        self.store = PhaseStore(args.output_dir, self.first_iteration, self.accelerator.is_main_process)
        self._hub = hub.start(self)  # with push_to_hub: check the Hub before any training
        self.reward_models = reward_sources.ExternalRewards(
            reward_model, reward_processing_class, judge_model, judge_processing_class, self.accelerator.device
        )

    # ---------------------------------------------------------------- parent fixes
    @property
    def beta(self) -> float:
        """β of the current round (the parent indexes a β list by a float epoch, which crashes)."""
        return self.args.beta_for_round(max(self.round, 1))

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Transformers' standard step (loss / GA steps, then backward) around our `compute_loss`, instead of the
        parent's step, which samples 2 completions inline and back-propagates an unscaled loss."""
        return Trainer.training_step(self, model, inputs, num_items_in_batch)

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        self.stats = {k: v for k, v in self.stats.items() if v}  # an empty list would divide by zero
        super()._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log with steps counted across rounds, so report_to integrations see one monotonic run."""
        self.state.global_step += self._step_offset
        try:
            super().log({**logs, "cream/round": self.round}, start_time)
        finally:
            self.state.global_step -= self._step_offset

    # The Trainer must not create repos or push on its own: CREAM pushes every iteration itself (trl_cream.hub).
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repo at init: `push_iteration` creates the iteration repos/branches."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=True)  # save, never push

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intra-round checkpoints are not pushed."""

    # ---------------------------------------------------------------- the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Mean CREAM loss of the batch: C·DPO(y+, y−) + (1 − C)·DPO(y−, y+) (Eq. 3.7)."""
        logps = completion_logps(
            model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
        ).sum(-1)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        losses = cream_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, inputs["consistency"], self.beta)
        with torch.no_grad():
            chosen_rewards = self.beta * (chosen - ref_chosen)
            rejected_rewards = self.beta * (rejected - ref_rejected)
            gather = self.accelerator.gather_for_metrics
            for key, value in {
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/margins": chosen_rewards - rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "logps/chosen": chosen,
                "logps/rejected": rejected,
                "cream/consistency": inputs["consistency"],
                "beta": torch.full_like(chosen, self.beta),
            }.items():
                self.stats.setdefault(key, []).append(gather(value.detach().float()).mean().item())
        return losses.mean()

    # ---------------------------------------------------------------- the rounds
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run all CREAM rounds: M_t → M_{t+1} for t = 1..num_iterations. Returns the last round's TrainOutput,
        with every round's metrics under ``metrics["rounds"]``.

        Args:
            resume_from_checkpoint (`bool` or `str`, *optional*): `True` (or the run's `output_dir`) resumes the
                run saved in `output_dir`: finished phases are loaded, not redone, and training continues from the
                last intra-round Trainer checkpoint if `save_strategy` made one; a path to one of those
                checkpoints (``rounds/round_<t>/trainer_checkpoints/checkpoint-<step>``) picks it explicitly.
        """
        done, chosen = self._open_run(resume_from_checkpoint)  # checks the manifest; reloads M<k> on resume
        shards = self.split_prompts()
        if not done and not self.store.has_iteration(self.first_iteration):
            if self.sft_dataset is not None and not self.sft_metrics:
                self.run_sft_stage()
                self.store.save_sft_metrics(self.sft_metrics)
            self.save_iteration(self.first_iteration)
            self.push_iteration(self.first_iteration)
        output = TrainOutput(self._step_offset, 0.0, {})
        for t, shard in enumerate(shards, start=1):
            if t > done:
                self.round = t
                output = self._run_round(t, shard, chosen[1] if chosen and chosen[0] == t else None)
        hub.wait(self)
        output.metrics["rounds"] = self.round_metrics
        if self.sft_metrics:
            output.metrics["sft"] = self.sft_metrics
        return output

    def run_sft_stage(self) -> dict[str, float]:
        """Algorithm 1 line 2: train M0 → M1 on `sft_dataset` with TRL's SFTTrainer, in place."""
        start = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)
        self.sft_metrics = run_sft(model, self.processing_class, self.sft_dataset, self.args)
        self.sft_metrics["time_sft_s"] = round(time.perf_counter() - start, 3)
        check_distinct_from_initial(model, self.ref_model, None)
        self.log({f"cream/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))})
        return self.sft_metrics

    @property
    def first_iteration(self) -> int:
        """Index of the starting policy in the M0, M1, ... naming (1: the model after SFT)."""
        return 1

    def iteration_dir(self, index: int) -> Path:
        return self.store.iteration_dir(index)

    def split_prompts(self) -> list[list[Any]]:
        """Shuffle the prompts with ``args.seed`` and split them equally across the rounds."""
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.args.seed)).tolist()
        prompts = [self.prompts[i]["prompt"] for i in order]
        return [list(chunk) for chunk in split_equally(prompts, self.args.num_iterations)]

    def _run_round(self, t: int, prompts: list[Any], checkpoint: Path | None = None) -> TrainOutput:
        """One round. Each phase's result is saved as soon as it is computed, and loaded instead of recomputed
        when an earlier attempt of the run finished it (see `trl_cream.checkpointing`)."""
        args, timings = self.args, {}
        logger.info(
            "CREAM round %d/%d: %d prompts x %d candidates", t, args.num_iterations, len(prompts), args.num_generations
        )
        with _timed(timings, "generate"):
            prompt_ids, candidates = self._sample_phase(t, prompts)
        with _timed(timings, "score"), frozen_gc(args.freeze_gc):
            scores = self._score_phase(t, prompt_ids, candidates)
        with _timed(timings, "pair"):
            pairs, metrics = self._pair_phase(t, prompts, prompt_ids, candidates, scores)
        self.log({f"cream/{k}": float(v) for k, v in metrics.items() if k != "round"})
        with _timed(timings, "train"):
            checkpoint = checkpoint or self._round_checkpoint(t)
            output = self._train_on_pairs(pairs, self.store.trainer_checkpoint_dir(t), checkpoint, seed=args.seed + t)
        metrics.update(train_loss=output.training_loss, train_steps=output.global_step)
        with _timed(timings, "save"):
            self.save_iteration(self.first_iteration + t)
        self.store.drop_trainer_checkpoints(t)
        metrics.update({f"time_{k}_s": v for k, v in timings.items()})
        self.store.save_round_metrics(t, {**metrics, "timings_s": timings})
        self.log({f"cream/{k}": float(v) for k, v in metrics.items() if k.startswith("time_")})
        self.round_metrics.append(metrics)
        self.push_iteration(self.first_iteration + t)
        return output

    def push_iteration(self, index: int) -> None:
        """Write the model card of ``output_dir/M<index>`` and, with ``push_to_hub``, push it in the background (main
        process only); the marker ``cream_state/pushed/M<index>.json`` is written once it is on the Hub."""
        hub.publish_iteration(self, index)

    def round_dir(self, t: int) -> Path:
        return self.store.round_dir(t)

    def _train_on_pairs(
        self, pairs: Dataset, output_dir: Path | None = None, resume_from: Path | None = None, seed: int | None = None
    ) -> TrainOutput:
        if len(pairs) == 0:
            logger.warning(
                "Round %d produced no preference pair: every prompt's candidates are tied (equal implicit rewards). "
                "Nothing is learnt this round and the policy is kept as is.",
                self.round,
            )
            return TrainOutput(0, 0.0, {})
        if seed is not None:
            set_seed(seed)  # the same data order and dropout whether or not sampling ran in this process
        self.train_dataset = pairs
        self.optimizer, self.lr_scheduler = None, None  # fresh AdamW and warm-up every round
        self.stats = {}
        history = self.state.log_history  # Trainer.train starts a fresh state; keep the whole run's history
        self._round_output_dir = str(output_dir) if output_dir is not None else None
        with frozen_gc(self.args.freeze_gc):
            try:
                output = super().train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            finally:
                self._round_output_dir = None
            self.state.log_history = history + self.state.log_history
            self._step_offset += self.state.global_step
            self.optimizer, self.lr_scheduler = None, None  # free AdamW's state before the next round's scoring
            engines.release_engine(self)  # DeepSpeed: the next round builds a fresh engine (trl_cream.engines)
            gc.collect()
        return output


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)
