"""The steps of a CREAM round, as functions of explicit values: score candidates under ``π_t``, ``π_0`` and
``π_{t−1}``, label them (rewards, rankings, C, pairs), advance ``π_{t−1}``, save the policy; and the values the
phases pass along (`RoundState`, `RoundSamples`, `Policy`).

`CreamTrainer` calls them through its hook methods (``score_round``, ``save_policy``); sampling goes from the
``generate_candidates`` hook straight to `trl_cream.modeling.sampling.generate_candidates`, whose
``GENERATION_BACKENDS`` table is where a generation backend plugs in.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.trainer import TRAINING_ARGS_NAME

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import CreamConfig

from .. import distributed, engines
from ..core.labelling import RoundScores, label_round
from ..modeling import adapters
from ..modeling.perf import sampled_policy_scores
from ..runs.tables import candidates_dataset, pairs_dataset
from ..runs.weights import load_adapter_weights
from .resume import RunStart

logger = logging.getLogger(__name__)

TokenIds = list[int]


@dataclass
class RoundState:
    """One round's own bookkeeping, created by `CreamTrainer.run_round` and passed from phase to phase (instead of
    being written on the trainer by one phase and read back by another).

    Attributes:
        t (`int`): the round, 1-based (π_t = ``M<iteration_index(t)>``).
        start (`RunStart`): how the run started: on a resume, which round it re-enters and from which checkpoint.
        reused (`list[str]`): the phases (``"generate"``, ``"score"``, ``"pair"``) a resume loaded instead of
            running, in order (``reused_phases`` in the round's metrics).
        timings (`dict[str, float]`): seconds per phase.
    """

    t: int
    start: RunStart = field(default_factory=RunStart)
    reused: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def resuming(self) -> bool:
        """Whether this is the round a resumed run re-enters."""
        return self.t == self.start.resumed_round

    def note_reuse(self, phase: str, what: str, reused: bool, where: Path) -> None:
        """Record (for the console line, metrics.json and the card) and log whether a resume reused ``phase``."""
        if reused:
            self.reused.append(phase)
            logger.info("Resuming round %d: %s reused from %s.", self.t, what, where)
        elif self.resuming:
            logger.info("Resuming round %d: %s recomputed.", self.t, what)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the seconds the block takes as ``timings[phase]`` (even if it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = round(time.perf_counter() - start, 3)


@dataclass
class RoundSamples:
    """What the sampling phase hands to the next ones.

    Attributes:
        prompts (`list`): the round's prompts as given (strings or chat messages), for the reward model or judge.
        prompt_ids (`list[list[int]]`): their token ids, as sampled from (long prompts left-truncated).
        candidates (`list[list[list[int]]]`): ``num_generations`` completions per prompt.
        policy_logps (`list[list[float]]` or `None`): π_t's summed log-probs recorded while sampling
            (`policy_logps_from_sampling`); `None` when the scoring forward must compute them.
    """

    prompts: list[Any]
    prompt_ids: list[TokenIds]
    candidates: list[list[TokenIds]]
    policy_logps: list[list[float]] | None = None


@dataclass
class Policy:
    """The models of a round and where they run, as the trainer holds them at the moment of the call.

    Attributes:
        accelerator: the run's `Accelerator`.
        model: the unwrapped policy (a `PeftModel` with LoRA).
        wrapped: the policy as the Trainer runs it (DDP / DeepSpeed engine / FSDP module, or the model itself).
        ref_model: π_0 for full fine-tuning; `None` with LoRA (π_0 is the adapter-free base).
        tokenizer: the policy's tokenizer.
        eos_ids: every token id that ends a completion.
        use_peft: whether the policy is a LoRA adapter.
        is_fsdp, is_deepspeed: the Trainer's ``is_fsdp_enabled`` / ``is_deepspeed_enabled``.
    """

    accelerator: Accelerator
    model: nn.Module
    wrapped: nn.Module
    ref_model: nn.Module | None
    tokenizer: PreTrainedTokenizerBase
    eos_ids: Sequence[int]
    use_peft: bool
    is_fsdp: bool = False
    is_deepspeed: bool = False


def score(
    policy: Policy,
    t: int,
    prompt_ids: list[TokenIds],
    candidates: list[list[TokenIds]],
    previous_dir: Path | None,
    policy_logps: list[list[float]] | None = None,
    *,
    max_length: int,
    batch_size: int,
    show_progress: bool,
) -> RoundScores:
    """Σ log-probs of these candidates under π_t, π_0 and π_{t−1} (Algorithm 1 lines 6 and 8); every rank calls it.

    Args:
        policy: the models.
        t: the round (π_{t−1} is scored from round 2 on).
        prompt_ids, candidates: this rank's share of the round.
        previous_dir: ``M<t−1>`` for full fine-tuning (loaded, scored, freed); LoRA scores its ``previous`` adapter.
        policy_logps: π_t's scores recorded while sampling, used instead of the π_t forward when they fit.
        max_length: prompt + completion tokens per sequence (longer prompts are left-truncated).
        batch_size: sequences per forward (``scoring_batch_size``).
        show_progress: whether to show the progress bars.
    """
    model, accelerator = policy.model, policy.accelerator

    def run(m: nn.Module, who: str) -> torch.Tensor:
        return distributed.score_shard(
            accelerator, m, prompt_ids, candidates, policy.tokenizer.pad_token_id, max_length, batch_size=batch_size,
            show_progress=show_progress, desc=f"round {t}: scoring {who}",
        )  # fmt: skip

    if distributed.needs_lockstep(accelerator):  # ZeRO-3/FSDP: every rank must run the π_t forwards, or a rank
        policy_logps = None  # falling back (prompt + candidate > max_length) would wait for the others forever
    scores_t = sampled_policy_scores(policy_logps, prompt_ids, candidates, max_length)
    if scores_t is None:
        with engines.scoring_policy(accelerator, model, policy.wrapped, policy.is_fsdp) as scored:  # ZeRO-3: gathered
            scores_t = run(scored, "π_t")
    previous = None
    if policy.use_peft:
        with model.disable_adapter():
            initial = run(model, "π_0")
        if t > 1:
            with adapters.using_adapter(model, adapters.PREVIOUS_ADAPTER):
                previous = run(model, "π_t-1")
    else:
        with _on_device(policy.ref_model, policy) as ref:
            initial = run(ref, "π_0")
        if t > 1:
            with _loaded_previous(previous_dir, policy, t) as prev:
                previous = run(prev, "π_t-1")
    lengths = torch.tensor([[len(c) for c in cands] for cands in candidates], dtype=torch.long)
    return RoundScores(policy=scores_t, initial=initial, previous=previous, lengths=lengths)


def label(
    t: int,
    samples: RoundSamples,
    scores: RoundScores,
    args: CreamConfig,
    decode: Callable[..., list[str]] | None = None,
) -> tuple[Dataset, dict[str, Any], Dataset | None]:
    """Round ``t``'s rewards, both rankings, C and best/worst pairs (Algorithm 1 lines 9-12), with the round's metrics;
    with ``decode`` (the tokenizer's ``batch_decode``), also the table of every candidate."""
    labels = label_round(scores, args.consistency_measure, args.consistency_granularity, args.round1_baseline)
    pairs = pairs_dataset(t, samples.prompt_ids, samples.candidates, scores, labels, args.ref_policy)
    metrics = {"round": t, "beta": args.beta_for_round(t), **labels.metrics}
    table = None
    if decode is not None:
        completions = [decode(c, skip_special_tokens=True) for c in samples.candidates]
        table = candidates_dataset(samples.prompts, samples.candidates, completions, scores, labels)
    return pairs, metrics, table


def advance_previous(policy: Policy) -> None:
    """LoRA: copy the policy adapter π_t into the frozen ``previous`` adapter, π_{t−1} of the next round (Algorithm 1
    line 8 of round t + 1). Full fine-tuning loads ``M<t>`` from disk instead: nothing to do."""
    if policy.use_peft:
        adapters.copy_adapter(policy.model, adapters.policy_adapter_name(policy.model), adapters.PREVIOUS_ADAPTER)


def restore_previous(policy: Policy, path: Path) -> None:
    """LoRA after a resume: the frozen ``previous`` adapter (π_{t−1}) is reloaded from ``path`` (``M<t−1>``)."""
    if not policy.use_peft:
        return
    model = policy.model
    adapters.copy_adapter(model, adapters.policy_adapter_name(model), adapters.PREVIOUS_ADAPTER)
    load_adapter_weights(model, adapters.PREVIOUS_ADAPTER, path)
    adapters.freeze_adapter(model, adapters.PREVIOUS_ADAPTER)


def save_policy(policy: Policy, path: Path, save_model: Callable[[str], None], engine: Any | None = None) -> None:
    """Save the current policy and the tokenizer to ``path``, once (every rank calls it; the main process writes):
    LoRA, the policy adapter alone; full fine-tuning, a ``from_pretrained`` folder through
    `distributed.save_full_model` (ZeRO-3: consolidated 16-bit weights; otherwise ``save_model``, the Trainer's).

    The Trainer's pickled ``training_args.bin`` is left out (the run's config is in the manifest, as JSON), so the
    folder holds only safetensors and JSON."""
    model, accelerator = policy.model, policy.accelerator
    if policy.use_peft:
        if accelerator.is_main_process:
            adapters.save_adapter(model, adapters.policy_adapter_name(model), path)
    else:
        distributed.save_full_model(accelerator, model, engine, save_model, path)
    if accelerator.is_main_process:
        policy.tokenizer.save_pretrained(path)
        (path / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


@contextmanager
def _on_device(model: nn.Module, policy: Policy) -> Iterator[nn.Module]:
    """Keep π_0 off the accelerator except while it scores, so that at most one extra model (π_0, then
    π_{t−1}) sits next to the policy on the GPU. No-op on CPU and under DeepSpeed/FSDP, which place it."""
    device = policy.accelerator.device
    offload = device.type != "cpu" and not (policy.is_deepspeed or policy.is_fsdp)
    if offload:
        model.to(device)
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@contextmanager
def _loaded_previous(path: Path | None, policy: Policy, t: int) -> Iterator[nn.Module]:
    """Load M_{t−1} (π_{t−1}) from its saved folder, placed like TRL reference models, to score; then free it."""
    if path is None or not path.exists():
        raise FileNotFoundError(f"π_(t-1) for round {t} should have been saved at {path}, but it is missing.")
    dtype = next(policy.model.parameters()).dtype
    previous = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # ZeRO-3: partitioned at load (zero.Init)
    previous = distributed.prepare_frozen(previous, policy.accelerator)
    try:
        yield previous
    finally:
        del previous
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
