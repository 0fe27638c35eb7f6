"""The model-facing phases of a CREAM round, mixed into `CreamTrainer`: sample candidates from the policy, score them
under ``π_t``, ``π_0`` and ``π_{t−1}``, and save the policy. A vLLM or other backend replaces these methods; the
round's orchestration (`CreamTrainer._run_round`, `trl_cream.resume`) stays as it is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from trl.models.utils import unwrap_model_for_generation

from .. import distributed, engines
from ..core.labelling import RoundScores
from ..modeling import adapters, sampling
from ..modeling.perf import sampled_policy_scores
from ..modeling.sampling import generate_candidates


class RoundPhasesMixin:
    """Sampling, scoring and saving for `CreamTrainer` (expects its attributes: ``args``, ``accelerator``, ``model``,
    ``model_wrapped``, ``ref_model``, ``use_peft``, ``_tokenizer``, ``eos_token_ids``, ``iteration_dir``)."""

    def generate_candidates(self, prompt_ids: list[list[int]], desc: str = "sampling") -> list[list[list[int]]]:
        """Sample ``num_generations`` candidates per prompt from the current policy (KV cache on)."""
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as unwrapped:
            self._sampled_logps: list[list[float]] | None = [] if self.args.policy_logps_from_sampling else None
            return generate_candidates(
                unwrapped,
                self._tokenizer,
                prompt_ids,
                self.args.num_generations,
                sampling.sampling_generation_config(
                    self.args, self.eos_token_ids, self._tokenizer.pad_token_id, self._tokenizer.bos_token_id
                ),
                batch_size=self.args.generation_batch_size,
                show_progress=self.accelerator.is_local_main_process,
                desc=desc,
                backend=self.args.generation_backend,
                logps_out=self._sampled_logps,
            )

    def score_round(self, t: int, prompt_ids: list[list[int]], candidates: list[list[list[int]]]) -> RoundScores:
        """Σ log-probs of this rank's candidates under π_t, π_0 and π_{t−1} (Algorithm 1 lines 6 and 8); every rank."""
        model = self.accelerator.unwrap_model(self.model)

        def score(m: nn.Module, who: str) -> torch.Tensor:
            return distributed.score_shard(
                self.accelerator, m, prompt_ids, candidates, self._tokenizer.pad_token_id, self.args.max_length,
                batch_size=self.args.scoring_batch_size, show_progress=self.accelerator.is_local_main_process,
                desc=f"round {t}: scoring {who}",
            )  # fmt: skip

        sampled, self._sampled_logps = getattr(self, "_sampled_logps", None), None
        if distributed.needs_lockstep(self.accelerator):  # ZeRO-3/FSDP: every rank must run the π_t forwards, or a
            sampled = None  # rank falling back (prompt + candidate > max_length) would wait for the others forever
        policy = sampled_policy_scores(sampled, prompt_ids, candidates, self.args.max_length)
        if policy is None:
            with engines.scoring_policy(self) as policy_model:  # FSDP: wrapped; ZeRO-3: weights gathered
                policy = score(policy_model, "π_t")
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
        return RoundScores(policy=policy, initial=initial, previous=previous, lengths=lengths)

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
        """Load M_{t−1} (π_{t−1}) from its saved folder, placed like TRL reference models, to score; then free it."""
        path = self.iteration_dir(self.first_iteration + t - 2)
        if not path.exists():
            raise FileNotFoundError(f"π_(t-1) for round {t} should have been saved at {path}, but it is missing.")
        dtype = next(self.accelerator.unwrap_model(self.model).parameters()).dtype
        previous = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # ZeRO-3: partitioned at load (zero.Init)
        previous = distributed.prepare_frozen(previous, self.accelerator)
        try:
            yield previous
        finally:
            del previous
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def save_policy(self, path: Path) -> None:
        """Save the current policy (full model, or only the policy adapter) and the tokenizer to ``path``, once."""
        model = self.accelerator.unwrap_model(self.model)
        if self.use_peft:
            if self.accelerator.is_main_process:
                adapters.save_adapter(model, adapters.policy_adapter_name(model), path)
                self._tokenizer.save_pretrained(path)
        else:
            distributed.save_full_model(self, path)  # ZeRO-3: consolidated 16-bit weights
            if self.accelerator.is_main_process:
                self._tokenizer.save_pretrained(path)
        self.accelerator.wait_for_everyone()
