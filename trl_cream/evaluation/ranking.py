"""Ranking consistency between consecutive checkpoints (paper Table 2): Kendall's τ, Spearman's ρ, TopOrder and
``C = (τ + 1) / 2`` as mean ± std over prompts, from rewards computed exactly as the trainer computes them."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..core.consistency import round_statistics
from ..core.rewards import baseline_rewards, implicit_rewards
from ..modeling import sampling, scoring


def _as_messages(prompt: str | Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> Any:
    """A plain prompt string becomes one user message (left as text when the tokenizer has no chat template)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if tokenizer.chat_template else prompt
    return list(prompt)


def consistency_stats(rewards: torch.Tensor, baseline: torch.Tensor) -> dict[str, Any]:
    """Table 2 from two ``[num_prompts, N]`` reward tensors: ``r`` of the newer model and ``r'`` of the older one.

    The same statistics as the training logs (`trl_cream.core.consistency.round_statistics`): a prompt whose ``r``
    or ``r'`` is entirely tied has no ranking and is left out of every mean and std, TopOrder included; it is
    counted in ``num_undefined``.
    """
    return round_statistics(rewards, baseline)


def ranking_consistency(
    new_model: torch.nn.Module,
    old_model: torch.nn.Module | None,
    initial_model: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    num_generations: int = 4,
    generation_config: GenerationConfig | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    seed: int | None = None,
    show_progress: bool = True,
    desc: str = "consistency",
    round1_baseline: str = "mean_logp",
) -> dict[str, Any]:
    """Ranking consistency between a checkpoint and its predecessor (paper Table 2, e.g. "M3 vs M2").

    ``num_generations`` candidates per prompt are sampled from ``new_model`` and scored (summed completion
    log-probs) under the new, old and initial (π_0) models. ``r = log π_new - log π_0`` ranks them for the new model,
    ``r' = log π_old - log π_0`` for the old one, and `consistency_stats` compares the two rankings.

    Special cases:
        - ``old_model is initial_model`` (or ``old_model=None``): round 1, where ``r'`` would be identically 0.
          The trainer's edge case is used instead: ``r'`` = π_0's length-normalised (``round1_baseline=
          "mean_logp"``) or summed (``"sum_logp"``) log-likelihood (`rewards.baseline_rewards`).
        - ``initial_model=None``: ``new_model`` must be a `PeftModel`; π_0 is its base, scored inside
          ``with new_model.disable_adapter():``. ``old_model`` may be another `PeftModel` or the same object.
        - ``new_model is old_model``: scored once; every defined prompt then has τ = 1 and C = 1.

    Args:
        new_model (`torch.nn.Module`): The newer checkpoint ``M_k``; candidates are sampled from it.
        old_model (`torch.nn.Module` or `None`): The previous checkpoint ``M_{k-1}``.
        initial_model (`torch.nn.Module` or `None`): π_0, the reference of the implicit rewards (``M0``).
        tokenizer (`PreTrainedTokenizerBase`): Shared tokenizer.
        prompts (`Sequence`): Prompt strings (wrapped as one user message) or chat message lists.
        num_generations (`int`, *optional*, defaults to `4`): Candidates per prompt ``N`` (at least 2).
        generation_config (`GenerationConfig`, *optional*): Sampling settings; defaults to ``do_sample=True``,
            temperature 1, 128 new tokens, the tokenizer's eos/pad.
        max_length (`int`, *optional*, defaults to `1024`): Prompt + completion tokens when scoring (the prompt is
            left-truncated).
        batch_size (`int`, *optional*, defaults to `8`): Prompts per `generate` call and sequences per forward.
        seed (`int`, *optional*): Seeds torch (globally) before sampling, for reproducible candidates.
        show_progress (`bool`, *optional*, defaults to `True`): One progress bar for sampling, one per scoring.
        desc (`str`, *optional*, defaults to `"consistency"`): Progress bar prefix.
        round1_baseline (`str`, *optional*, defaults to `"mean_logp"`): ``r'`` when the old model is π_0:
            ``"mean_logp"`` or ``"sum_logp"`` (see `rewards.baseline_rewards`).

    Returns:
        `dict`: `consistency_stats` output, with ``num_generations`` and ``round1_baseline`` added.
    """
    _check_ranking_inputs(new_model, initial_model, num_generations)
    if hasattr(prompts, "column_names"):
        prompts = prompts["prompt"]
    if generation_config is None:
        generation_config = _default_sampling_config(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    prompt_ids = sampling.tokenize_prompts(tokenizer, [_as_messages(p, tokenizer) for p in prompts])
    common = {"batch_size": batch_size, "show_progress": show_progress}
    candidates = sampling.generate_candidates(
        new_model, tokenizer, prompt_ids, num_generations, generation_config, **common, desc=f"{desc} sampling"
    )
    new_logps, old_logps, initial_logps = _score_checkpoints(
        new_model, old_model, initial_model, prompt_ids, candidates, sampling.pad_token_id(tokenizer), max_length,
        common, desc,
    )  # fmt: skip
    lengths = torch.tensor([[len(c) for c in cands] for cands in candidates])
    rewards = implicit_rewards(new_logps, initial_logps)
    baseline = baseline_rewards(old_logps, initial_logps, lengths, round1_baseline)
    stats = consistency_stats(rewards, baseline)
    stats.update(num_generations=num_generations, round1_baseline=round1_baseline if old_logps is None else None)
    return stats


def _check_ranking_inputs(new_model: torch.nn.Module, initial_model: torch.nn.Module | None, n: int) -> None:
    if n < 2:
        raise ValueError(f"Ranking needs num_generations >= 2 candidates per prompt, got {n}.")
    if initial_model is None and not hasattr(new_model, "disable_adapter"):
        raise ValueError(
            f"initial_model=None means 'π_0 = new_model with adapters disabled', but new_model is a "
            f"{type(new_model).__name__}, not a PeftModel. Pass the initial (M0) model explicitly."
        )


def _default_sampling_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """``do_sample=True``, temperature 1, no top-p/top-k, 128 new tokens, the tokenizer's eos/pad."""
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128)
    config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=sampling.pad_token_id(tokenizer))
    return config


def _score_checkpoints(
    new_model: torch.nn.Module,
    old_model: torch.nn.Module | None,
    initial_model: torch.nn.Module | None,
    prompt_ids: list[list[int]],
    candidates: list[list[list[int]]],
    pad_id: int,
    max_length: int,
    common: dict[str, Any],
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Σ log-probs of the candidates under the new, old and initial models (π_0 first, then new, then old); the old
    model's are `None` in round 1 (old = π_0) and the new model's when old and new are the same object."""

    def score(model: torch.nn.Module, name: str, disable_adapter: bool = False) -> torch.Tensor:
        with model.disable_adapter() if disable_adapter else contextlib.nullcontext():
            return scoring.score_candidates(
                model, prompt_ids, candidates, pad_id, max_length, **common, desc=f"{desc} scoring {name}"
            )

    if initial_model is None:
        initial_logps = score(new_model, "π_0", disable_adapter=True)
    else:
        initial_logps = score(initial_model, "π_0")
    new_logps = score(new_model, "new")
    if old_model is None or old_model is initial_model:
        old_logps = None  # round 1: rank by π_0's length-normalised likelihood
    else:
        old_logps = new_logps if old_model is new_model else score(old_model, "old")
    return new_logps, old_logps, initial_logps
