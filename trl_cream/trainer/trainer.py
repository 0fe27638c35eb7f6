"""CreamTrainer: TRL's online DPO trainer, run as CREAM rounds (Algorithm 1).

One round is a chain of phases that take and return values: sample → score → (advance π_{t−1}) → label → train →
save → publish. Each saved phase goes through `PhaseStore.load_or_compute`, so a resumed run loads what an earlier
attempt finished. The model-facing work is in `trl_cream.trainer.phases`, the TRL coupling in
`trl_cream.trainer.trl_base`, the on-disk layout in `trl_cream.runs`.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import TrainOutput
from trl.models.utils import unwrap_model_for_generation

from .. import distributed, engines, hub, inspection
from ..core.labelling import RoundScores
from ..core.loss import cream_dpo_loss, pair_metrics
from ..modeling import reward_sources, sampling
from ..modeling.perf import frozen_gc
from ..modeling.sampling import SamplingSettings, tokenize_prompts
from ..modeling.scoring import completion_logps
from ..runs.manifest import build_manifest, run_identity
from ..runs.store import PhaseStore
from . import phases, report, resume, run_log
from .config import CreamConfig
from .data import PairCollator, split_equally
from .phases import RoundSamples
from .sft import run_sft
from .trl_base import TrlOnlineDPOBase
from .validation import (
    check_distinct_from_initial,
    check_finite_scores,
    check_inputs,
    check_single_train,
    check_training_finite,
    fit_prompts,
)
from .vllm_engine import ColocatedEngine

logger = logging.getLogger(__name__)

TokenIds = list[int]


class CreamTrainer(TrlOnlineDPOBase):
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
        "citation": report.CITATION,
    }

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
        check_inputs(model, ref_model, args, train_dataset, processing_class, peft_config, sft_dataset)
        reward_sources.check_reward_setup(args.reward_source, args.baseline_source, reward_model, judge_model)
        identity = run_identity(model, ref_model, processing_class, is_peft_model(model) or peft_config is not None)
        if sft_dataset is not None:  # ZeRO-3: π_0 built partitioned from M0 (TRL's create_reference_model refuses)
            ref_model = engines.initial_reference(model, is_peft_model(model) or peft_config is not None)
        super().__init__(
            model, ref_model, args, train_dataset, processing_class, peft_config, callbacks, optimizers
        )  # fmt: skip
        self.args: CreamConfig
        self.use_peft = is_peft_model(self.model)
        distributed.setup(self.accelerator, args, self.use_peft)
        self.data_collator = PairCollator(self.tokenizer.pad_token_id, args.max_length)
        self.prompts = train_dataset
        self.sft_dataset = sft_dataset
        self.sft_metrics: dict[str, float] = {}
        self.round_metrics: list[dict[str, Any]] = []
        self._run_identity, self._train_called = identity, False  # the models as given; one run per train()
        self.vllm_engine = ColocatedEngine()  # generation_backend="vllm": started on first use, kept across rounds
        self.store = PhaseStore(
            args.output_dir, is_main=self.accelerator.is_main_process, barrier=self.accelerator.wait_for_everyone
        )
        self._hub = hub.start(  # with push_to_hub: check the Hub before any training
            args, use_peft=self.use_peft, base_model=self._base_model(), is_main=self.accelerator.is_main_process,
            num_processes=self.accelerator.num_processes,
        )  # fmt: skip
        self.reward_models = reward_sources.ExternalRewards(
            reward_model, reward_processing_class, judge_model, judge_processing_class, self.accelerator.device
        )
        self.lr_probe = report.LearningRateProbe()  # tells a round that ran at learning rate 0
        self.add_callback(self.lr_probe)

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
            self.record_metrics(
                pair_metrics(chosen, rejected, ref_chosen, ref_rejected, inputs["consistency"], self.beta)
            )
        return losses.mean()

    # ---------------------------------------------------------------- Algorithm 1
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run all CREAM rounds: M_t → M_{t+1} for t = 1..num_iterations. Returns the last round's TrainOutput,
        with every round's metrics under ``metrics["rounds"]``.

        Args:
            resume_from_checkpoint (`bool` or `str`, *optional*): `True` (or the run's `output_dir`) resumes the
                run saved in `output_dir`: finished phases are loaded, not redone, and training continues from the
                last intra-round Trainer checkpoint if `save_strategy` made one; a path to one of those
                checkpoints (``rounds/round_<t>/trainer_checkpoints/checkpoint-<step>``) picks it explicitly.
        """
        check_single_train(self._train_called, self.args.output_dir)
        self._train_called = True
        with resume.run_lock(self.args.output_dir, self.accelerator) as lock:  # one run per folder at a time
            return self._train(resume_from_checkpoint, lock)

    def _train(self, resume_from_checkpoint: str | bool | None, lock: resume.RunLock | None = None) -> TrainOutput:
        start = self._open_run(resume_from_checkpoint, lock)
        shards = self.split_prompts()
        first = self.store.iteration(1)
        if not start.resumed and not self.store.has_iteration(first):
            if self.sft_dataset is not None and not self.sft_metrics:
                self.run_sft_stage()  # line 2: M1 = SFT(M0)
                self.store.save_sft_metrics(self.sft_metrics)
            self.save_iteration(first)
            self.push_iteration(first)
        output = TrainOutput(self.run_steps, 0.0, {})
        try:
            for t, prompts in enumerate(shards, start=1):  # line 4: for t = 1..T
                if t > start.done:
                    output = self.run_round(t, prompts, start)
        finally:
            self.vllm_engine.close()  # before anything destroys the process group
        self.end_logging_run()
        if self._hub is not None:
            self._hub.wait()
        output.metrics["rounds"] = self.round_metrics
        if self.sft_metrics:
            output.metrics["sft"] = self.sft_metrics
        return output

    def run_round(self, t: int, prompts: list[Any], start: resume.RunStart | None = None) -> TrainOutput:
        """Round ``t``: M_t → M_{t+1} on ``prompts`` (what `train` runs for each round not finished yet; callable on
        its own, e.g. by a benchmark, once ``M<iteration_index(t)>`` exists). Each phase's result is saved as soon as
        it is computed, and loaded instead of recomputed when an earlier attempt of the run finished it."""
        args, state = self.args, phases.RoundState(t, start or resume.RunStart())
        step = self.start_round(t)  # the round's own metrics are logged at its first training step
        self.lr_probe.reset()
        logger.info(
            "CREAM round %d/%d: %d prompts x %d candidates", t, args.num_iterations, len(prompts), args.num_generations
        )
        with state.timed("generate"):
            samples = self.sample_phase(state, prompts)  # line 5: N responses per prompt from π_t
        with state.timed("score"), frozen_gc(args.freeze_gc):
            scores = self.score_phase(state, samples)  # lines 6, 8: log π_t, log π_0, log π_{t−1}
        phases.advance_previous(self._policy())  # π_t becomes round t + 1's π_{t−1}
        with state.timed("pair"):
            pairs, metrics = self.label_phase(state, samples, scores)  # lines 9-12: rankings, C, pairs
        self.log_at({f"cream/{k}": float(v) for k, v in report.tidy(metrics).items() if k != "round"}, step)
        inspection.log_completions(self, t, samples, scores, pairs, step)  # log_completions: the round's table
        with state.timed("train"):
            output = self.train_phase(state, pairs)  # lines 13-14
        check_training_finite(self.accelerator, self.model, output.training_loss, t, args)  # before M_{t+1} is saved
        metrics.update(train_loss=output.training_loss if output.global_step else None, train_steps=output.global_step)
        report.flag_no_op(t, metrics, self.lr_probe)  # warns once and marks a round that learnt nothing
        with state.timed("save"):
            self.save_iteration(self.store.iteration(t + 1))  # M_{t+1}
        self.store.drop_trainer_checkpoints(t)
        metrics.update({f"time_{k}_s": v for k, v in state.timings.items()})
        metrics = report.tidy({**metrics, "reused_phases": sorted(state.reused)})
        self.store.save_round_metrics(t, metrics)
        self.log_at({f"cream/{k}": float(v) for k, v in metrics.items() if k.startswith("time_")}, step)
        if self.is_world_process_zero():
            print(report.round_line(metrics, args.num_iterations), flush=True)
        self.round_metrics.append(metrics)
        self.push_iteration(self.store.iteration(t + 1))
        return output

    # ---------------------------------------------------------------- the phases
    def sample_phase(self, state: phases.RoundState, prompts: list[Any]) -> RoundSamples:
        """The round's prompts as token ids and ``num_generations`` candidates each. Every rank samples its share
        (seed from ``seed``, ``t`` and its rank); all get the whole round."""
        args, t = self.args, state.t
        prompt_ids = fit_prompts(
            tokenize_prompts(self.processing_class, prompts), args.max_length, args.max_new_tokens,
            args.long_prompts, f"round {t}'s prompts",
        )  # fmt: skip
        sampled: dict[str, Any] = {"logps": None}  # π_t's scores from sampling exist only if this process samples

        def sample() -> list[list[TokenIds]]:
            shard = distributed.start_round(self.accelerator, len(prompt_ids), args.seed, t)
            self.vllm_engine.policy_dir = self.store.iteration_dir(self.store.iteration(t))  # π_t, saved before
            sink: list[list[float]] | None = [] if args.policy_logps_from_sampling else None
            extra = {"logps_out": sink} if sink is not None else {}
            local = self.generate_candidates(shard.select(prompt_ids), desc=f"round {t}: sampling", **extra)
            sampled["logps"] = sink
            return distributed.gather_candidates(shard, local)

        store = self.store
        candidates, reused = store.load_or_compute(
            partial(store.load_samples, t, prompt_ids), sample, partial(store.save_samples, t, prompt_ids)
        )
        state.note_reuse("generate", "samples", reused, self.store.round_dir(state.t))
        return RoundSamples(list(prompts), prompt_ids, candidates, sampled["logps"])

    def score_phase(self, state: phases.RoundState, samples: RoundSamples) -> RoundScores:
        """Every candidate's Σ log-prob under π_t, π_0 and π_{t−1} (each rank its share, then gathered), plus the
        external reward/baseline when configured; refused if not finite."""
        t = state.t

        def compute() -> RoundScores:
            policy = self._policy()
            if state.start.restores_previous(t):
                phases.restore_previous(policy, self.store.iteration_dir(self.store.iteration(t - 1)))
            shard = distributed.round_shard(self.accelerator, len(samples.prompt_ids))  # the split of sampling
            local = shard.select(samples.candidates)
            kwargs = {"policy_logps": samples.policy_logps} if samples.policy_logps is not None else {}
            scores = self.score_round(t, shard.select(samples.prompt_ids), local, **kwargs)
            scores = distributed.gather_scores(shard, scores, samples.candidates)
            scores = reward_sources.add_external_rewards(
                scores, self.reward_models, self.args, samples.prompts, samples.candidates, policy.model,
                policy.tokenizer, show_progress=self._shows_progress(),
            )  # fmt: skip
            k = self.store.iteration(t)
            named = {f"π_t (M{k})": scores.policy, "π_0": scores.initial, f"π_t-1 (M{k - 1})": scores.previous}
            check_finite_scores(named, t, next(policy.model.parameters()).dtype)
            return scores

        scores, reused = self.store.load_or_compute(
            partial(self.store.load_scores, t), compute, partial(self.store.save_scores, t)
        )
        state.note_reuse("score", "scores", reused, self.store.round_dir(state.t))
        return scores

    def label_phase(
        self, state: phases.RoundState, samples: RoundSamples, scores: RoundScores
    ) -> tuple[Dataset, dict[str, Any]]:
        """Rewards, both rankings, C and the best/worst pairs (Algorithm 1 lines 9-12), with the round's metrics."""
        args, t = self.args, state.t

        def label() -> tuple[Dataset, dict[str, Any], Dataset | None]:
            self.store.drop_trainer_checkpoints(t)  # they would belong to pairs that are no longer on disk
            with_table = args.save_round_artifacts and self.accelerator.is_main_process
            return phases.label(t, samples, scores, args, self.processing_class.batch_decode if with_table else None)

        def load() -> tuple[Dataset, dict[str, Any], None] | None:
            loaded = self.store.load_pairs(t)
            return None if loaded is None else (*loaded, None)

        (pairs, metrics, _), reused = self.store.load_or_compute(load, label, lambda r: self.store.save_pairs(t, *r))
        state.note_reuse("pair", "pairs", reused, self.store.round_dir(state.t))
        return pairs, metrics

    def train_phase(self, state: phases.RoundState, pairs: Dataset) -> TrainOutput:
        """Train π_t on the round's pairs with the CREAM loss (reference: the scoring pass's log-probs), from the
        round's intra-round Trainer checkpoint when a resume has one."""
        t = state.t
        checkpoint = state.start.trainer_checkpoint(t, self.store)
        if state.resuming:
            how = f"continues from {checkpoint}" if checkpoint else "runs from the round's start"
            logger.info("Resuming round %d: training %s.", t, how)
        if len(pairs) == 0:  # `report.flag_no_op` says why and marks the round
            return TrainOutput(0, 0.0, {})
        return self.train_on_pairs(pairs, self.store.trainer_checkpoint_dir(t), checkpoint, seed=self.args.seed + t)

    # ---------------------------------------------------------------- hooks (documented override points)
    def generate_candidates(
        self, prompt_ids: list[TokenIds], desc: str = "sampling", logps_out: list[list[float]] | None = None
    ) -> list[list[TokenIds]]:
        """Sample ``num_generations`` candidates per prompt from the current policy: the one extension point for
        sampling. It hands the unwrapped policy and the run's `SamplingSettings` to
        `trl_cream.modeling.sampling.generate_candidates`, which runs the backend named by ``generation_backend``
        (a key of ``sampling.GENERATION_BACKENDS``, where a new backend is registered). Override it to sample
        elsewhere; with ``logps_out``, append each candidate's summed log-prob under the sampling pass (one row per
        prompt), or leave it empty to have π_t scored by a forward pass. With ``generation_backend="vllm"`` the
        candidates come from this process's vLLM engine (`trainer/vllm_engine.py`), made to hold the round's ``M<k>``:
        it needs the run's state (the engine kept across rounds, the saved ``M<k>``), so it is not a table entry."""
        settings, tokenizer = SamplingSettings.from_args(self.args), self.tokenizer
        if settings.backend == "vllm":
            return self.vllm_engine.generate(self._policy(), self.args, settings, prompt_ids, logps_out)
        config = settings.generation_config(tokenizer, self.eos_ids)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as model:
            return sampling.generate_candidates(
                model, tokenizer, prompt_ids, settings.num_generations, config,
                batch_size=settings.batch_size, show_progress=self._shows_progress(), desc=desc,
                backend=settings.backend, logps_out=logps_out,
            )  # fmt: skip

    def score_round(
        self,
        t: int,
        prompt_ids: list[TokenIds],
        candidates: list[list[TokenIds]],
        policy_logps: list[list[float]] | None = None,
    ) -> RoundScores:
        """Σ log-probs of this rank's candidates under π_t, π_0 and π_{t−1} (Algorithm 1 lines 6 and 8); every rank."""
        previous_dir = self.store.iteration_dir(self.store.iteration(t - 1))
        return phases.score(
            self._policy(), t, prompt_ids, candidates, previous_dir, policy_logps, max_length=self.args.max_length,
            batch_size=self.args.scoring_batch_size, show_progress=self._shows_progress(),
        )  # fmt: skip

    def push_iteration(self, index: int) -> None:
        """Write the model card of ``output_dir/M<index>`` and, with ``push_to_hub``, push it in the background (main
        process only); the marker ``cream_state/pushed/M<index>.json`` is written once it is on the Hub."""
        if not self.accelerator.is_main_process:
            return
        hub.publish_iteration(
            self._hub, hub.CardSettings.from_args(self.args), index, first_index=self.store.iteration(1),
            trainer_cls=type(self), round_metrics=self.round_metrics, sft_metrics=self.sft_metrics,
            use_peft=self.use_peft, base_model=self._base_model(),
        )  # fmt: skip

    # ---------------------------------------------------------------- the run
    def _open_run(
        self, resume_from_checkpoint: str | bool | None, lock: resume.RunLock | None = None
    ) -> resume.RunStart:
        """Check/record the manifest; on resume reload the policy and the finished rounds' metrics, and push the saved
        iterations whose push did not finish."""
        args = self.args
        manifest = build_manifest(
            args, self.prompts, self.sft_dataset, self.use_peft, self.store.iteration(1), self._run_identity
        )
        start = resume.open_run(
            self.store, manifest, self.accelerator, resume_from_checkpoint, args.num_iterations,
            args.overwrite_output_dir, lock,
        )  # fmt: skip
        if start.gradient_accumulation_steps is not None:  # another process count: the global batch is kept
            args.gradient_accumulation_steps = start.gradient_accumulation_steps
        if start.resumed:
            self.sft_metrics = start.sft_metrics
            resume.restore_policy(
                self._policy().model, self.use_peft, self.store.iteration_dir(self.store.iteration(start.done + 1))
            )
            self.round_metrics.extend(start.round_metrics)
            self.count_steps(int(start.sft_metrics.get("sft_steps", 0)) + start.train_steps)
            if self._pushes_to_hub():
                for index in resume.unpushed_iterations(self.store, start.done):
                    logger.info("Resuming: M%d was saved but its push did not finish; pushing it now.", index)
                    self.push_iteration(index)
        return start

    def _shows_progress(self) -> bool:
        """Sampling/scoring/judge bars: on the local main process, unless ``disable_tqdm``."""
        return self.accelerator.is_local_main_process and not self.args.disable_tqdm

    def _pushes_to_hub(self) -> bool:
        """Whether saved iterations are published (``push_to_hub``)."""
        return bool(getattr(self.args, "push_to_hub", False))

    def run_sft_stage(self) -> dict[str, float]:
        """Algorithm 1 line 2: train M0 → M1 on `sft_dataset` with TRL's SFTTrainer, in place."""
        start = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)
        forward = run_log.SFTLogForwarder(self.log_at)  # the stage's logs go to this run, at steps 1..S
        self.sft_metrics = run_sft(
            model, self.processing_class, self.sft_dataset, self.args, callbacks=[forward], report_to="none"
        )
        self.sft_metrics["time_sft_s"] = round(time.perf_counter() - start, 3)
        check_distinct_from_initial(model, self.ref_model, None)
        self.count_steps(int(self.sft_metrics.get("sft_steps", 0)))
        numbers = {f"cream/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))}
        self.log_at(numbers, self.run_steps)
        return self.sft_metrics

    def save_iteration(self, index: int) -> None:
        """Save the policy (full model, or only the policy adapter) and the tokenizer as ``output_dir/M<index>``: the
        one extension point for saving. Written to a temporary folder by `phases.save_policy`, then renamed into
        place; an iteration holds only safetensors and JSON (the run's config is in the manifest)."""
        with self.store.writing_iteration(index) as folder:
            phases.save_policy(self._policy(), folder, self.save_model, engine=getattr(self, "deepspeed", None))
        self.accelerator.wait_for_everyone()

    def round_dir(self, t: int) -> Path:
        return self.store.round_dir(t)

    def split_prompts(self) -> list[list[Any]]:
        """Shuffle the prompts with ``args.seed`` and split them equally across the rounds."""
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.args.seed)).tolist()
        prompts = [self.prompts[i]["prompt"] for i in order]
        return [list(chunk) for chunk in split_equally(prompts, self.args.num_iterations)]

    def _policy(self) -> phases.Policy:
        """The models as they are now (the Trainer re-wraps the policy when training starts)."""
        return phases.Policy(
            accelerator=self.accelerator,
            model=self.accelerator.unwrap_model(self.model),
            wrapped=self.model_wrapped,
            ref_model=self.ref_model,
            tokenizer=self.tokenizer,
            eos_ids=self.eos_ids,
            use_peft=self.use_peft,
            is_fsdp=self.is_fsdp_enabled,
            is_deepspeed=self.is_deepspeed_enabled,
        )

    def _base_model(self) -> str | None:
        return hub.base_model_path(self.accelerator.unwrap_model(self.model), self.ref_model, self.use_peft)
