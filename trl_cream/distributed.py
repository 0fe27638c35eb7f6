"""Splitting a CREAM round across processes and gathering it back (any world size, 1 included).

Each rank samples and scores only its share of a round's prompts; the ranks then gather what labelling needs
(candidates and their summed log-probs under ``π_t``, ``π_0`` and ``π_{t−1}``), in the original prompt order, so
``C``, the τ statistics and the pairs are computed on the whole round, identically on every rank. Training then
shards the pairs the Trainer way (every rank builds the same pairs dataset; the accelerate dataloader splits it).

Under DeepSpeed ZeRO-3 and FSDP every forward is a collective: all ranks must run the same number of ``generate``
calls and scoring forwards. The split is then padded (the last prompt repeated, its copy dropped at the gather) and
ranks with fewer scoring batches run dummy forwards (`pad_forward_passes`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, set_seed

from .core.labelling import RoundScores
from .engines import LaunchArgs, check_engine_requested, check_zero3_sampling, full_state_dict, is_deepspeed, is_zero3
from .modeling.scoring import score_candidates

TokenIds = list[int]


@dataclass
class Shard:
    """The prompts of a round that one rank samples and scores.

    Attributes:
        indices (`list[int]`): positions in the round's prompt list, in order. Under ``lockstep`` the last one may
            repeat a prompt that another rank (or this one) also has: padding, dropped at the gather.
        num_prompts (`int`): prompts in the whole round.
    """

    indices: list[int]
    num_prompts: int

    def select(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of a whole-round list (``items[j]`` for ``j`` in ``indices``)."""
        return [items[j] for j in self.indices]


def rank_seed(seed: int, round_index: int, rank: int) -> int:
    """Sampling seed of ``rank`` in round ``round_index``: ``seed + round`` on rank 0 (the 1-process seed), a distinct
    stream on every other rank so that the ranks do not draw the same samples."""
    return seed + round_index + 1_000_003 * rank


def shard_round(num_prompts: int, state: PartialState | Any, lockstep: bool = False) -> Shard:
    """Contiguous split of ``range(num_prompts)`` over the processes, with accelerate's
    ``split_between_processes`` (sizes differ by at most one; earlier ranks take the extra prompt).

    Args:
        num_prompts: prompts in the round.
        state: an `accelerate.PartialState` or `Accelerator` (anything with ``split_between_processes``).
        lockstep: give every rank the same number of prompts by repeating the last one (ZeRO-3 / FSDP, where
            ranks must run the same number of forwards).
    """
    with state.split_between_processes(list(range(num_prompts)), apply_padding=lockstep) as local:
        return Shard(indices=list(local), num_prompts=num_prompts)


def round_shard(accelerator: Any, num_prompts: int) -> Shard:
    """This rank's share of a round's prompts, padded to equal shares under ZeRO-3 / FSDP."""
    return shard_round(num_prompts, accelerator, needs_lockstep(accelerator))


def start_round(accelerator: Any, num_prompts: int, seed: int, round_index: int) -> Shard:
    """This rank's share of a round (`round_shard`) with its sampling seed set."""
    shard = round_shard(accelerator, num_prompts)
    set_seed(rank_seed(seed, round_index, accelerator.process_index))
    return shard


def _gather_by_prompt(shard: Shard, rows: Sequence[Any]) -> list[Any]:
    """Gather one row per local prompt from every rank into the round's prompt order (lockstep padding, a repeated
    prompt, keeps its first copy)."""
    if len(rows) != len(shard.indices):
        raise ValueError(f"This rank has {len(shard.indices)} prompts but {len(rows)} rows to gather.")
    by_prompt: dict[int, Any] = {}
    for j, row in gather_object(list(zip(shard.indices, rows))):
        by_prompt.setdefault(j, row)
    missing = sorted(set(range(shard.num_prompts)) - set(by_prompt))
    if missing or len(by_prompt) != shard.num_prompts:
        raise RuntimeError(
            f"The gathered round covers {len(by_prompt)} of {shard.num_prompts} prompts (missing {missing[:10]}): "
            "every rank must call the round with the same prompts and world size."
        )
    return [by_prompt[j] for j in range(shard.num_prompts)]


def gather_candidates(shard: Shard, candidates: Sequence[Sequence[TokenIds]]) -> list[list[TokenIds]]:
    """Every rank's sampled candidates (``[len(shard.indices)][N]`` token ids, ragged) as the whole round, in prompt
    order, identical on every rank."""
    return _gather_by_prompt(shard, [[list(c) for c in cands] for cands in candidates])


def gather_scores(shard: Shard, scores: RoundScores, candidates: Sequence[Sequence[TokenIds]]) -> RoundScores:
    """Every rank's `RoundScores` of its share as the scores of the whole round (``candidates``: the whole round's,
    for the lengths), in prompt order, identical on every rank."""
    has_previous = scores.previous is not None
    rows = [
        (scores.policy[k].tolist(), scores.initial[k].tolist(), scores.previous[k].tolist() if has_previous else None)
        for k in range(len(shard.indices))
    ]
    ordered = _gather_by_prompt(shard, rows)
    return RoundScores(
        policy=torch.tensor([r[0] for r in ordered], dtype=torch.float32),
        initial=torch.tensor([r[1] for r in ordered], dtype=torch.float32),
        previous=torch.tensor([r[2] for r in ordered], dtype=torch.float32) if has_previous else None,
        lengths=torch.tensor([[len(c) for c in cands] for cands in candidates], dtype=torch.long),
    )


def num_scoring_batches(candidates: Sequence[Sequence[TokenIds]], batch_size: int) -> int:
    """Forward passes `scoring.score_candidates` runs for these candidates: the distinct (prompt, candidate) pairs,
    ``batch_size`` per forward."""
    unique = {(j, tuple(c)) for j, cands in enumerate(candidates) for c in cands}
    return math.ceil(len(unique) / batch_size)


@torch.no_grad()
def pad_forward_passes(model: torch.nn.Module, count: int, device: torch.device | str) -> None:
    """Run ``count`` one-token forwards, so that a rank with fewer scoring batches joins the collectives
    (ZeRO-3 parameter all-gathers, FSDP unshards) that the other ranks' extra batches trigger."""
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    for _ in range(count):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def score_shard(
    accelerator: Any,
    model: torch.nn.Module,
    prompt_ids: Sequence[TokenIds],
    candidates: Sequence[Sequence[TokenIds]],
    pad_id: int,
    max_length: int,
    batch_size: int,
    **kwargs: Any,
) -> torch.Tensor:
    """`scoring.score_candidates` on this rank's share (``[0, 0]`` when it has no prompt); under ZeRO-3 / FSDP, the
    rank then runs dummy forwards until it has run as many as the busiest rank. Every rank must call it."""
    batches = num_scoring_batches(candidates, batch_size)
    most = max_over_ranks(batches) if needs_lockstep(accelerator) else batches
    scores = torch.zeros(0, 0)
    if candidates:
        scores = score_candidates(model, prompt_ids, candidates, pad_id, max_length, batch_size, **kwargs)
    pad_forward_passes(model, most - batches, accelerator.device)
    return scores


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks (the value itself with one process)."""
    return max(gather_object([value]))


def prepare_frozen(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Place a frozen scoring model (``π_{t−1}`` loaded from disk) the way TRL prepares its reference models:
    `trl.models.utils.prepare_deepspeed` under DeepSpeed (ZeRO-3 shards it like the policy; ZeRO-1/2 keep a full copy
    per rank), `prepare_fsdp` under FSDP, otherwise a full copy on this rank's device (DDP: scoring is local)."""
    model.eval()
    if is_deepspeed(accelerator):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model, accelerator)
    return model.to(accelerator.device)  # not accelerator.prepare_model: it would keep a reference every round


def needs_lockstep(accelerator: Any) -> bool:
    """Whether ranks must run the same number of forwards: ZeRO-3 or FSDP with several processes."""
    state = accelerator.state
    sharded = is_zero3(accelerator) or getattr(state, "fsdp_plugin", None) is not None
    return sharded and state.num_processes > 1


@runtime_checkable
class ProcessArgs(LaunchArgs, Protocol):
    """What [`setup`] reads of the config: the engine fields, the sampling backend and the process's log level
    (`CreamConfig` satisfies it structurally)."""

    generation_backend: str
    ds3_gather_for_generation: bool

    @property
    def should_log(self) -> bool: ...
    def get_process_log_level(self) -> int: ...


def setup(accelerator: Any, args: ProcessArgs, use_peft: bool) -> None:
    """Once, when the trainer is built: refuse unsupported sharded set-ups (`check_supported`) and log from the
    replicas at their Trainer level (``log_level_replica``, warnings by default), so round messages appear once."""
    check_engine_requested(accelerator, args)
    check_supported(accelerator, use_peft)
    backend, gather = args.generation_backend, args.ds3_gather_for_generation
    check_zero3_sampling(accelerator, gather)
    check_generation_backend(accelerator, backend, gather)
    if not args.should_log:
        logging.getLogger(__package__).setLevel(args.get_process_log_level())


def check_supported(accelerator: Any, use_peft: bool) -> None:
    """Refuse, before any expensive work, the sharded set-ups a CREAM run cannot save or sample with.

    - ZeRO-3 (full fine-tuning) saves ``M<k>`` as consolidated 16-bit weights (a ``from_pretrained`` folder), which
      needs ``stage3_gather_16bit_weights_on_model_save``; FSDP needs a ``FULL_STATE_DICT``. Otherwise every ``M<k>``
      would be a sharded checkpoint that ``from_pretrained`` (and the next round's ``π_{t−1}``) cannot load.
    - LoRA / QLoRA saves and copies its adapters from the full local weights: run it with DDP or ZeRO-1/2 (the
      4-bit base of an 8B model is ~5.5 GB and fits each GPU), not ZeRO-3 or FSDP.
    """
    state = accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    if use_peft and (is_zero3(accelerator) or fsdp is not None):
        raise ValueError(
            "LoRA/QLoRA adapters are not supported under DeepSpeed ZeRO-3 or FSDP: their weights would be saved "
            "sharded. Launch with examples/accelerate_configs/multi_gpu.yaml (DDP) or deepspeed_zero2.yaml instead."
        )
    if is_zero3(accelerator):
        config = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not config.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError(
                "DeepSpeed ZeRO-3 is on but `stage3_gather_16bit_weights_on_model_save` is false: every M<k> would be "
                "saved as a DeepSpeed checkpoint that from_pretrained cannot load. Set `zero3_save_16bit_model: true` "
                "in the accelerate config (see examples/accelerate_configs/deepspeed_zero3.yaml)."
            )
    if fsdp is not None and "FULL_STATE_DICT" not in str(getattr(fsdp, "state_dict_type", "")):
        raise ValueError(
            f"FSDP `state_dict_type` is {getattr(fsdp, 'state_dict_type', None)}: M<k> would not be saved as a "
            "from_pretrained folder. Set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config "
            "(see examples/accelerate_configs/fsdp.yaml)."
        )


def check_generation_backend(accelerator: Any, backend: str, ds3_gather_for_generation: bool) -> None:
    """Refuse ``generation_backend="vllm"`` under ZeRO-3/FSDP (the engine's weights are pushed whole), and
    ``generation_backend="paged"`` where a rank cannot generate on its own: under FSDP, or ZeRO-3 without
    ``ds3_gather_for_generation``, every forward is a collective, and continuous batching (unlike ``generate``'s
    ``synced_gpus``) does not keep the ranks in step, so the run would hang."""
    fsdp = getattr(accelerator.state, "fsdp_plugin", None) is not None
    if backend == "vllm" and (fsdp or is_zero3(accelerator)):
        raise ValueError(
            f"generation_backend='vllm' is not supported under {'FSDP' if fsdp else 'DeepSpeed ZeRO-3'}: the engine "
            "would need the sharded weights gathered into it before every round. Use DDP or ZeRO-1/2 "
            "(examples/accelerate_configs/multi_gpu.yaml, deepspeed_zero2.yaml), or generation_backend='generate'."
        )
    if backend != "paged" or accelerator.state.num_processes < 2:
        return
    if fsdp or (is_zero3(accelerator) and not ds3_gather_for_generation):
        where = "FSDP" if fsdp else "DeepSpeed ZeRO-3 with ds3_gather_for_generation=False"
        raise ValueError(
            f"generation_backend='paged' cannot run under {where}: continuous batching does not keep the ranks' "
            "sharded forwards in step. Use generation_backend='generate'"
            + ("." if fsdp else ", or set ds3_gather_for_generation=True.")
        )


def save_full_model(
    accelerator: Any, model: torch.nn.Module, engine: Any | None, save_model: Callable[[str], None], path: Path
) -> None:
    """Save a fully fine-tuned policy as a ``from_pretrained`` folder (the main process writes; all ranks must call
    it).

    Under DeepSpeed no ``engine`` exists when ``M<k>`` is saved (before round 1, and after each round's engine is
    released, see `trl_cream.engines`), so the unwrapped ``model`` is saved: ZeRO-3 weights are gathered one parameter
    at a time, ZeRO-1/2 weights are whole on every rank. FSDP: the full state dict, gathered one tensor at a time.
    Both gather through `engines.full_state_dict`. Otherwise ``save_model`` (`Trainer.save_model`)."""
    if is_deepspeed(accelerator) and engine is None:
        state = full_state_dict(model, accelerator.is_main_process) if is_zero3(accelerator) else None
        if accelerator.is_main_process:
            model.save_pretrained(path, state_dict=state)
    elif getattr(accelerator.state, "fsdp_plugin", None) is not None:
        state = full_state_dict(model, accelerator.is_main_process)  # FSDP2: gathered one tensor at a time
        if accelerator.is_main_process:
            model.save_pretrained(path, state_dict=state)
    else:
        save_model(str(path))
