"""Implicit DPO rewards and best/worst preference pairs (paper Eq. 3.9, 3.11, 3.12; Algorithm 1 lines 6-9, 12-13).

All functions work row-wise on ``[num_prompts, N]`` tensors of summed completion log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def implicit_rewards(policy_logps: torch.Tensor, initial_logps: torch.Tensor) -> torch.Tensor:
    """``r_ij = log π_t(y_ij|x_j) - log π_0(y_ij|x_j)`` (Eq. 3.9 without ``β`` and ``β log Z(x_j)``, line 6).

    ``β > 0`` and ``log Z(x_j)`` are the same for every candidate of a prompt, so dropping them keeps the ranking.

    Args:
        policy_logps (`torch.Tensor`): ``Σ log π_t`` over each candidate's completion tokens, ``[num_prompts, N]``.
        initial_logps (`torch.Tensor`): ``Σ log π_0`` over the same tokens, ``[num_prompts, N]``.
    """
    if policy_logps.shape != initial_logps.shape:
        raise ValueError(f"Shape mismatch: {tuple(policy_logps.shape)} vs {tuple(initial_logps.shape)}.")
    return policy_logps - initial_logps


ROUND1_BASELINES: tuple[str, ...] = ("mean_logp", "sum_logp")


def baseline_rewards(
    previous_logps: torch.Tensor | None,
    initial_logps: torch.Tensor,
    completion_lengths: torch.Tensor,
    round1_baseline: str = "mean_logp",
) -> torch.Tensor:
    """The baseline reward ``r'`` used to rank with the previous checkpoint ``π_{t-1}`` (line 8).

    From round 2 on, ``r' = log π_{t-1}(y|x) - log π_0(y|x)``. In round 1 ``π_{t-1} = π_0``, so that difference is
    identically 0; the paper then ranks by ``π_0``'s own likelihood instead. ``round1_baseline`` picks its form:
    ``"mean_logp"`` (default, as in the authors' code) is the length-normalised ``Σ log π_0(y|x) / |y|``, so that
    short candidates are not favoured just for being short; ``"sum_logp"`` is the summed ``Σ log π_0(y|x)`` that
    the paper's text writes. Pass ``previous_logps=None`` for round 1.

    Args:
        previous_logps (`torch.Tensor` or `None`): ``Σ log π_{t-1}``, ``[num_prompts, N]``; `None` in round 1.
        initial_logps (`torch.Tensor`): ``Σ log π_0``, ``[num_prompts, N]``.
        completion_lengths (`torch.Tensor`): number of completion tokens of each candidate, ``[num_prompts, N]``.
        round1_baseline (`str`, *optional*, defaults to `"mean_logp"`): ``"mean_logp"`` or ``"sum_logp"``.
    """
    if round1_baseline not in ROUND1_BASELINES:
        raise ValueError(
            f"round1_baseline={round1_baseline!r} is unknown; choose one of {', '.join(ROUND1_BASELINES)}."
        )
    if previous_logps is not None:
        return implicit_rewards(previous_logps, initial_logps)
    if round1_baseline == "sum_logp":
        return initial_logps.clone()
    return initial_logps / completion_lengths.clamp_min(1).to(initial_logps.dtype)


@dataclass
class PairSelection:
    """Best/worst pairs of the prompts that have a strict preference.

    Attributes:
        prompt_index (`torch.Tensor`): index of the prompt of each pair in the round's prompt list, ``[num_pairs]``.
        chosen_index (`torch.Tensor`): candidate index of ``y+`` (highest reward), ``[num_pairs]``.
        rejected_index (`torch.Tensor`): candidate index of ``y-`` (lowest reward), ``[num_pairs]``.
        consistency (`torch.Tensor`): ``C`` of each pair, taken from its own prompt, ``[num_pairs]``.
        tied_prompts (`torch.Tensor`): indices of the prompts skipped because all their rewards are equal.
    """

    prompt_index: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    consistency: torch.Tensor
    tied_prompts: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.prompt_index.numel())

    @property
    def num_tied(self) -> int:
        return int(self.tied_prompts.numel())


def select_pairs(rewards: torch.Tensor, consistency: torch.Tensor | float) -> PairSelection:
    """Pair the best candidate with the worst one for every prompt (Eq. 3.11; Eq. 3.12 is the same pair reversed).

    A prompt whose ``N`` rewards are all equal has no preference: it yields no pair and is reported in
    ``tied_prompts`` (never silently dropped). Per-sample consistencies are gathered by prompt index, so each
    pair keeps its own prompt's ``C`` whatever was skipped before it.

    Args:
        rewards (`torch.Tensor`): ``r`` of every candidate, ``[num_prompts, N]``.
        consistency (`torch.Tensor` or `float`): a dataset-level scalar ``C`` or one ``C`` per prompt
            ``[num_prompts]``.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"Expected rewards of shape [num_prompts, N>=2], got {tuple(rewards.shape)}.")
    c = torch.as_tensor(consistency, dtype=torch.float64, device=rewards.device)
    if c.dim() == 0:
        c = c.expand(rewards.shape[0])
    elif c.shape != (rewards.shape[0],):
        raise ValueError(f"Per-prompt consistency must have shape [{rewards.shape[0]}], got {tuple(c.shape)}.")
    best, worst = rewards.argmax(-1), rewards.argmin(-1)
    has_pair = rewards.max(-1).values > rewards.min(-1).values
    keep = has_pair.nonzero().squeeze(-1)
    return PairSelection(
        prompt_index=keep,
        chosen_index=best[keep],
        rejected_index=worst[keep],
        consistency=c[keep].clone(),
        tied_prompts=(~has_pair).nonzero().squeeze(-1),
    )


def rank_descending(rewards: torch.Tensor) -> torch.Tensor:
    """Rank ``J_ij`` of each candidate within its prompt, 1 = best, ties sharing their average rank (line 7)."""
    signs = torch.sign(rewards.unsqueeze(-1) - rewards.unsqueeze(-2)).double()
    better = (signs < 0).sum(-1).double()
    tied = (signs == 0).sum(-1).double()
    return better + (tied + 1) / 2
