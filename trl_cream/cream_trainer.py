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
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput
from trl.experimental.online_dpo import OnlineDPOTrainer
from trl.models.utils import unwrap_model_for_generation

from . import adapters, reward_sources
from .artifacts import RoundScores, candidates_dataset, label_round, pairs_dataset, save_metrics, save_round
from .cream_config import CreamConfig
from .data import PairCollator, split_equally, validate_prompts, validate_sft_dataset
from .loss import cream_dpo_loss
from .sampling import completion_logps, generate_candidates, score_candidates, tokenize_prompts
from .sft import run_sft

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


class CreamTrainer(OnlineDPOTrainer):
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
        if isinstance(model, str):
            raise TypeError("Pass an instantiated model (M1), not a model id; load it with from_pretrained first.")
        if sft_dataset is not None:
            validate_sft_dataset(sft_dataset)
            if ref_model is not None:
                raise ValueError(
                    "With `sft_dataset`, `model` is M0 and π_0 is taken from it before the SFT stage: leave "
                    "`ref_model=None`."
                )
        else:
            use_peft = is_peft_model(model) or peft_config is not None
            if not use_peft and ref_model is None:
                raise ValueError(
                    "Full fine-tuning needs the initial model π_0 (M0) as `ref_model`: CREAM's rewards are "
                    "log π_t − log π_0. Pass ref_model=M0, pass `sft_dataset` to run the SFT stage from M0, or "
                    "train LoRA adapters (π_0 is then the adapter-free base)."
                )
            _check_distinct_from_initial(model, ref_model, peft_config)
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
        with every round's metrics under ``metrics["rounds"]``."""
        if resume_from_checkpoint:
            raise NotImplementedError("Resuming CREAM rounds is not supported yet; start a new output_dir.")
        shards = self.split_prompts()
        if self.sft_dataset is not None and not self.sft_metrics:
            self.run_sft_stage()
        self.save_policy(self.iteration_dir(self.first_iteration))
        output = TrainOutput(0, 0.0, {})
        for t, shard in enumerate(shards, start=1):
            self.round = t
            output = self._run_round(t, shard)
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
        _check_distinct_from_initial(model, self.ref_model, None)
        self.log({f"cream/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))})
        return self.sft_metrics

    @property
    def first_iteration(self) -> int:
        """Index of the starting policy in the M0, M1, ... naming (1: the model after SFT)."""
        return 1

    def iteration_dir(self, index: int) -> Path:
        return Path(self.args.output_dir) / f"M{index}"

    def split_prompts(self) -> list[list[Any]]:
        """Shuffle the prompts with ``args.seed`` and split them equally across the rounds."""
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.args.seed)).tolist()
        prompts = [self.prompts[i]["prompt"] for i in order]
        return [list(chunk) for chunk in split_equally(prompts, self.args.num_iterations)]

    def _run_round(self, t: int, prompts: list[Any]) -> TrainOutput:
        args, timings = self.args, {}
        logger.info(
            "CREAM round %d/%d: %d prompts x %d candidates", t, args.num_iterations, len(prompts), args.num_generations
        )
        with _timed(timings, "generate"):
            set_seed(args.seed + t)
            prompt_ids = tokenize_prompts(self.processing_class, prompts)
            candidates = self.generate_candidates(prompt_ids, desc=f"round {t}: sampling")
        with _timed(timings, "score"):
            scores = self.score_round(t, prompt_ids, candidates)
        with _timed(timings, "pair"):
            labels = label_round(scores, args.consistency_measure, args.consistency_granularity, args.round1_baseline)
            pairs = pairs_dataset(t, prompt_ids, candidates, scores, labels, args.ref_policy)
        metrics = {"round": t, "beta": self.beta, **labels.metrics}
        self.log({f"cream/{k}": float(v) for k, v in metrics.items() if k != "round"})
        with _timed(timings, "train"):
            output = self._train_on_pairs(pairs)
        with _timed(timings, "save"):
            self.save_policy(self.iteration_dir(self.first_iteration + t))
            if args.save_round_artifacts and self.accelerator.is_main_process:
                completions = [self.processing_class.batch_decode(c, skip_special_tokens=True) for c in candidates]
                table = candidates_dataset(prompts, candidates, completions, scores, labels)
                save_round(self.round_dir(t), table, pairs)
        metrics.update({f"time_{k}_s": v for k, v in timings.items()}, train_loss=output.training_loss)
        if args.save_round_artifacts and self.accelerator.is_main_process:
            save_metrics(self.round_dir(t), {**metrics, "timings_s": timings})
        self.log({f"cream/{k}": float(v) for k, v in metrics.items() if k.startswith("time_")})
        self.round_metrics.append(metrics)
        return output

    def round_dir(self, t: int) -> Path:
        return Path(self.args.output_dir) / "rounds" / f"round_{t}"

    def _train_on_pairs(self, pairs: Dataset) -> TrainOutput:
        if len(pairs) == 0:
            logger.warning("Round %d produced no preference pair (all prompts tied); the policy is kept.", self.round)
            return TrainOutput(self.state.global_step, 0.0, {})
        self.train_dataset = pairs
        self.optimizer, self.lr_scheduler = None, None  # fresh AdamW and warm-up every round
        self.stats = {}
        history = self.state.log_history  # Trainer.train starts a fresh state; keep the whole run's history
        output = super().train()
        self.state.log_history = history + self.state.log_history
        self._step_offset += self.state.global_step
        self.optimizer, self.lr_scheduler = None, None  # free AdamW's state before the next round's scoring
        self.accelerator.free_memory()
        gc.collect()
        return output

    # ---------------------------------------------------------------- phases a vLLM or distributed path can replace
    def generate_candidates(self, prompt_ids: list[list[int]], desc: str = "sampling") -> list[list[list[int]]]:
        """Sample ``num_generations`` candidates per prompt from the current policy (KV cache on)."""
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as unwrapped:
            return generate_candidates(
                unwrapped,
                self._tokenizer,
                prompt_ids,
                self.args.num_generations,
                self.generation_config,
                batch_size=self.args.generation_batch_size,
                show_progress=self.accelerator.is_local_main_process,
                desc=desc,
            )

    def score_round(self, t: int, prompt_ids: list[list[int]], candidates: list[list[list[int]]]) -> RoundScores:
        """Σ log-probs of every candidate under π_t, π_0 and π_{t−1} (Algorithm 1 lines 6 and 8)."""
        model = self.accelerator.unwrap_model(self.model)

        def score(m: nn.Module, who: str) -> torch.Tensor:
            return score_candidates(
                m, prompt_ids, candidates, self._tokenizer.pad_token_id, self.args.max_length,
                batch_size=self.args.scoring_batch_size, show_progress=self.accelerator.is_local_main_process,
                desc=f"round {t}: scoring {who}",
            )  # fmt: skip

        policy = score(model, "π_t")
        if self.use_peft:
            with model.disable_adapter():
                initial = score(model, "π_0")
            previous = None
            if t > 1:
                with adapters.using_adapter(model, adapters.PREVIOUS_ADAPTER):
                    previous = score(model, "π_t-1")
            adapters.copy_adapter(model, adapters.policy_adapter_name(model), adapters.PREVIOUS_ADAPTER)
        else:
            with self._on_device(self.ref_model) as ref:
                initial = score(ref, "π_0")
            previous = None
            if t > 1:
                with self._loaded_previous(t) as prev:
                    previous = score(prev, "π_t-1")
        lengths = torch.tensor([[len(c) for c in cands] for cands in candidates], dtype=torch.long)
        scores = RoundScores(policy=policy, initial=initial, previous=previous, lengths=lengths)
        return reward_sources.add_external_rewards(self, scores, prompt_ids, candidates)

    @contextmanager
    def _on_device(self, model: nn.Module) -> Iterator[nn.Module]:
        """Keep π_0 off the accelerator except while it scores, so that at most one extra model (π_0, then
        π_{t−1}) sits next to the policy on the GPU. No-op on CPU and under DeepSpeed/FSDP, which place it."""
        offload = self.accelerator.device.type != "cpu" and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if offload:
            model.to(self.accelerator.device)
        try:
            yield model
        finally:
            if offload:
                model.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @contextmanager
    def _loaded_previous(self, t: int) -> Iterator[nn.Module]:
        """Load M_{t−1} (π_{t−1}) from its saved folder for scoring, then free it."""
        path = self.iteration_dir(self.first_iteration + t - 2)
        if not path.exists():
            raise FileNotFoundError(f"π_(t-1) for round {t} should have been saved at {path}, but it is missing.")
        dtype = next(self.accelerator.unwrap_model(self.model).parameters()).dtype
        previous = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.accelerator.device).eval()
        try:
            yield previous
        finally:
            del previous
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def save_policy(self, path: Path) -> None:
        """Save the current policy (full model, or only the policy adapter) and the tokenizer to ``path``."""
        model = self.accelerator.unwrap_model(self.model)
        if self.use_peft:
            if self.accelerator.is_main_process:
                adapters.save_adapter(model, adapters.policy_adapter_name(model), path)
                self._tokenizer.save_pretrained(path)
        else:
            self.save_model(str(path))
            if self.accelerator.is_main_process:
                self._tokenizer.save_pretrained(path)
        self.accelerator.wait_for_everyone()


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _check_distinct_from_initial(model: nn.Module, ref_model: nn.Module | None, peft_config: Any | None) -> None:
    """Refuse a round 1 where π_t = π_0: every reward would be 0, every candidate tied, and nothing learnt."""
    message = (
        "The policy (M1) is identical to the initial model π_0, so in round 1 every implicit reward "
        "log π_1 − log π_0 is 0, every candidate is tied and no preference pair can be formed. Run an SFT stage "
        "first (Algorithm 1 line 2) or pass a distinct M1."
    )
    if peft_config is not None and not is_peft_model(model):
        raise ValueError(message + " (A fresh `peft_config` adapter starts as the identity.)")
    if is_peft_model(model):
        if adapters.is_identity_adapter(model, adapters.policy_adapter_name(model)):
            raise ValueError(message + " (The active LoRA adapter has all-zero lora_B weights.)")
        return
    if ref_model is model:
        raise ValueError(message + " (`ref_model` is the same object as `model`.)")
    ref_params = dict(ref_model.named_parameters()) if ref_model is not None else {}
    for name, param in model.named_parameters():
        other = ref_params.get(name)
        if other is None or other.shape != param.shape:
            return
        if not torch.equal(param.detach(), other.detach().to(param.device)):
            return
    raise ValueError(message + " (Every parameter of `model` equals `ref_model`'s.)")
