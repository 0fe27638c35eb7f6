"""The phases of a CREAM round as resumable steps, mixed into `CreamTrainer`.

Each ``_*_phase`` method loads the phase's result from ``output_dir/rounds/round_<t>`` when an earlier attempt of
the run saved it, and otherwise computes it and saves it atomically right away (`trl_cream.checkpointing`). Sampling
is seeded with ``seed + t`` and training with ``seed + t`` again, so a phase redone after a crash gives the same
result as in an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..core.labelling import RoundScores, candidates_dataset, label_round, pairs_dataset
from ..modeling import adapters, reward_sources
from ..modeling.sampling import tokenize_prompts
from ..runs.manifest import build_manifest
from ..runs.store import load_adapter_weights, load_full_weights
from .validation import check_finite_scores, fit_prompts

logger = logging.getLogger(__name__)

TokenIds = list[int]


class ResumableRoundsMixin:
    """Resume support and the saved phases of a round; expects the attributes of `CreamTrainer`."""

    # ---------------------------------------------------------------- the run
    def _open_run(self, resume_from_checkpoint: str | bool | None) -> tuple[int, tuple[int, Path] | None]:
        """Check/record the manifest; on resume reload the policy and the finished rounds' metrics.

        Returns:
            The number of finished rounds and an explicitly chosen intra-round checkpoint ``(round, folder)``.
        """
        store, resume = self.store, bool(resume_from_checkpoint)
        chosen = self._chosen_checkpoint(resume_from_checkpoint)
        manifest = build_manifest(self.args, self.prompts, self.sft_dataset, self.use_peft, self.first_iteration)
        clear = store.check(manifest, resume=resume, overwrite=self.args.overwrite_output_dir)  # every process
        self.accelerator.wait_for_everyone()  # all have read the old manifest before the main process replaces it
        if not resume:
            store.record(manifest, clear)
            self.accelerator.wait_for_everyone()
        if not (resume and store.has_iteration(self.first_iteration)):
            return 0, chosen
        done = store.last_complete_round(self.args.num_iterations)
        self.sft_metrics = store.load_sft_metrics()
        self.steps.finish_stage(int(self.sft_metrics.get("sft_steps", 0)))
        self._restore_policy(self.first_iteration + done)
        self._resumed_round = done + 1
        for t in range(1, done + 1):
            store.drop_trainer_checkpoints(t)  # left over when a crash came right after M<first+t> was saved
            self.round_metrics.append(store.load_round_metrics(t))
            self.steps.finish_stage(int(self.round_metrics[-1].get("train_steps", 0)))
        self._push_saved_iterations(done)
        logger.info("Resuming the CREAM run in %s after %d finished round(s).", self.args.output_dir, done)
        return done, chosen

    def _chosen_checkpoint(self, resume_from_checkpoint: str | bool | None) -> tuple[int, Path] | None:
        """(round, folder) of an explicitly given intra-round Trainer checkpoint; None for `True` or output_dir."""
        if not isinstance(resume_from_checkpoint, (str, Path)):
            return None
        path, out = Path(resume_from_checkpoint).resolve(), Path(self.args.output_dir).resolve()
        if path == out:
            return None
        for t in range(1, self.args.num_iterations + 1):
            folder = self.store.trainer_checkpoint_dir(t).resolve()
            if path.parent == folder and (path / "trainer_state.json").exists():
                return t, path
        raise ValueError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: a CREAM run resumes from its output_dir "
            f"({out}) or from a checkpoint under {out}/rounds/round_<t>/trainer_checkpoints/; pass True to resume "
            "from the latest state found there."
        )

    def _restore_policy(self, index: int) -> None:
        """Load ``M<index>`` into the policy: the full weights, or the policy adapter."""
        path = self.store.iteration_dir(index)
        logger.info("Resuming: the policy is reloaded from %s", path)
        model = self.accelerator.unwrap_model(self.model)
        if self.use_peft:
            load_adapter_weights(model, adapters.policy_adapter_name(model), path)
        else:
            load_full_weights(model, path)

    def _restore_previous_adapter(self, t: int) -> None:
        """LoRA after a resume: the frozen ``cream_previous`` adapter (π_{t−1}) is reloaded from ``M<t−1>``."""
        if not (self.use_peft and t > 1 and t == self._resumed_round):
            return
        model = self.accelerator.unwrap_model(self.model)
        adapters.copy_adapter(model, adapters.policy_adapter_name(model), adapters.PREVIOUS_ADAPTER)
        load_adapter_weights(model, adapters.PREVIOUS_ADAPTER, self.store.iteration_dir(self.first_iteration + t - 2))
        adapters.freeze_adapter(model, adapters.PREVIOUS_ADAPTER)

    def _push_saved_iterations(self, done: int) -> None:
        """On resume, push the saved iterations whose push marker is missing (``cream_state/pushed/M<k>.json``)."""
        if not self._pushes_to_hub():
            return
        for index in range(self.first_iteration, self.first_iteration + done + 1):
            if self.store.has_iteration(index) and not self.store.is_pushed(index):
                logger.info("Resuming: M%d was saved but its push did not finish; pushing it now.", index)
                self.push_iteration(index)

    def _pushes_to_hub(self) -> bool:
        """Whether saved iterations are published (``push_to_hub``)."""
        return bool(getattr(self.args, "push_to_hub", False))

    def push_iteration(self, index: int) -> None:
        """Called right after ``M<index>`` is saved (and on resume for an iteration whose push did not finish).

        The Hub support (`trl_cream.hub`) defines the real one in `CreamTrainer`; this default publishes nothing."""

    def _round_checkpoint(self, t: int) -> Path | None:
        """The intra-round Trainer checkpoint to continue round ``t`` from (only the round a resume starts in)."""
        checkpoint = self.store.last_trainer_checkpoint(t) if t == self._resumed_round else None
        if checkpoint is not None:
            logger.info("Resuming round %d: training continues from %s.", t, checkpoint)
        elif t == self._resumed_round:
            logger.info("Resuming round %d: training runs from the round's start (no intra-round checkpoint).", t)
        return checkpoint

    def _note_phase(self, t: int, phase: str, reused: bool, what: str) -> None:
        """Record (for the console line, metrics.json and the card) and log whether a resume reused a phase."""
        if reused:
            self.phase_status[phase] = "reused"
            logger.info("Resuming round %d: %s reused from %s.", t, what, self.store.round_dir(t))
        elif t == self._resumed_round:
            logger.info("Resuming round %d: %s recomputed.", t, what)

    def save_iteration(self, index: int) -> None:
        """Save the policy as ``output_dir/M<index>``: written to a temporary folder, then renamed into place.

        The Trainer's pickled ``training_args.bin`` is left out (the run's config is in the manifest, as JSON), so an
        iteration holds only safetensors and JSON."""
        with self.store.writing_iteration(index) as tmp:
            self.save_policy(tmp)
            if self.accelerator.is_main_process:
                (tmp / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

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

    # ---------------------------------------------------------------- the phases
    def _sample_phase(self, t: int, prompts: list[Any]) -> tuple[list[TokenIds], list[list[TokenIds]]]:
        args = self.args
        prompt_ids = fit_prompts(
            tokenize_prompts(self.processing_class, prompts), args.max_length, args.max_new_tokens,
            args.long_prompts, f"round {t}'s prompts",
        )  # fmt: skip
        self._sampled_logps = None  # π_t's scores from sampling exist only if this process samples the round
        candidates = self.store.load_samples(t, prompt_ids)
        self.accelerator.wait_for_everyone()  # every rank has looked before the main process can write
        self._note_phase(t, "generate", candidates is not None, "samples")
        if candidates is None:  # each rank samples its share (seed from seed, t and rank); all get the whole round
            shard = distributed.start_round(self.accelerator, len(prompt_ids), args.seed, t)
            local = self.generate_candidates(shard.select(prompt_ids), desc=f"round {t}: sampling")
            candidates = distributed.gather_candidates(shard, local)
            self.store.save_samples(t, prompt_ids, candidates)
        return prompt_ids, candidates

    def _score_phase(self, t: int, prompt_ids: list[TokenIds], candidates: list[list[TokenIds]]) -> RoundScores:
        scores = self.store.load_scores(t)
        self.accelerator.wait_for_everyone()
        self._note_phase(t, "score", scores is not None, "scores")
        model = self.accelerator.unwrap_model(self.model)
        if scores is not None:
            if self.use_peft:  # what score_round does after scoring: π_t becomes the next round's π_{t−1}
                adapters.copy_adapter(model, adapters.policy_adapter_name(model), adapters.PREVIOUS_ADAPTER)
            return scores
        self._restore_previous_adapter(t)
        shard = distributed.round_shard(self.accelerator, len(prompt_ids))  # the same split as sampling
        local = shard.select(candidates)  # each rank scores its share; the scores of the whole round are gathered
        scores = distributed.gather_scores(shard, self.score_round(t, shard.select(prompt_ids), local), candidates)
        scores = reward_sources.add_external_rewards(self, scores, prompt_ids, candidates)  # on the whole round
        k = self.first_iteration + t - 1
        named = {f"π_t (M{k})": scores.policy, "π_0": scores.initial, f"π_t-1 (M{k - 1})": scores.previous}
        check_finite_scores(named, t, next(model.parameters()).dtype)
        self.store.save_scores(t, scores)
        return scores

    def _pair_phase(
        self,
        t: int,
        prompts: list[Any],
        prompt_ids: list[TokenIds],
        candidates: list[list[TokenIds]],
        scores: RoundScores,
    ) -> tuple[Dataset, dict[str, Any]]:
        loaded = self.store.load_pairs(t)
        self.accelerator.wait_for_everyone()
        self._note_phase(t, "pair", loaded is not None, "pairs")
        if loaded is not None:
            return loaded
        args = self.args
        self.store.drop_trainer_checkpoints(t)  # they would belong to pairs that are no longer on disk
        labels = label_round(scores, args.consistency_measure, args.consistency_granularity, args.round1_baseline)
        pairs = pairs_dataset(t, prompt_ids, candidates, scores, labels, args.ref_policy)
        metrics = {"round": t, "beta": self.beta, **labels.metrics}
        table = None
        if args.save_round_artifacts and self.accelerator.is_main_process:
            completions = [self.processing_class.batch_decode(c, skip_special_tokens=True) for c in candidates]
            table = candidates_dataset(prompts, candidates, completions, scores, labels)
        self.store.save_pairs(t, pairs, metrics, table)
        return pairs, metrics
