"""A round's scores, labels and pairs: rewards, both rankings, ``C`` and the best/worst pairs (Algorithm 1 lines
6-12), and the two tables a round keeps, ``candidates`` (one row per candidate, with every log-prob, reward and
rank) and ``pairs`` (the preference pairs trained on, with their ``C`` and reference log-probs) are built as
`datasets.Dataset`s from these labels by `trl_cream.trainer.data`; where they are written is `trl_cream.runs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .consistency import consistency_rate, round_statistics
from .rewards import PairSelection, baseline_rewards, implicit_rewards, select_pairs

TokenIds = list[int]


@dataclass
class RoundScores:
    """Summed completion log-probs of every candidate of a round, each ``[num_prompts, N]``.

    Attributes:
        policy (`torch.Tensor`): under the round-start policy ``π_t``.
        initial (`torch.Tensor`): under the initial model ``π_0``.
        previous (`torch.Tensor` or `None`): under ``π_{t−1}``; `None` in round 1, where ``π_{t−1} = π_0``.
        lengths (`torch.Tensor`): completion token counts.
        reward (`torch.Tensor` or `None`): the ranking reward ``r`` when it does not come from the implicit reward
            (`reward_source="reward_model"` or `"judge"`); `None` means ``log π_t − log π_0``.
        baseline (`torch.Tensor` or `None`): the baseline reward ``r'`` when it comes from a reward model
            (`baseline_source="reward_model"`); `None` means π_{t−1}'s implicit reward.
        reward_metrics (`dict`): diagnostics of those sources (e.g. judge parse failures), merged into the
            round's metrics.
    """

    policy: torch.Tensor
    initial: torch.Tensor
    previous: torch.Tensor | None
    lengths: torch.Tensor
    reward: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    reward_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundLabels:
    """What the scores imply: rewards, ``C`` and the pairs."""

    rewards: torch.Tensor
    baseline: torch.Tensor
    consistency: torch.Tensor
    pairs: PairSelection
    metrics: dict[str, float]


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    values = values[~torch.isnan(values)].double()
    if values.numel() == 0:
        return math.nan, math.nan
    return values.mean().item(), values.std(unbiased=False).item()


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def label_round(
    scores: RoundScores, measure: str, granularity: str, round1_baseline: str = "mean_logp"
) -> RoundLabels:
    """Rewards (line 6, 8), consistency (lines 10-11), pairs (line 12) and the round's diagnostics.

    ``r`` is the implicit reward ``log π_t − log π_0`` unless ``scores.reward`` holds another source's reward (a
    reward model or a judge, see `trl_cream.modeling.reward_sources`); ``r'`` is the previous checkpoint's implicit
    reward (round 1: π_0's likelihood, ``round1_baseline``) unless ``scores.baseline`` holds an external baseline
    reward.
    """
    rewards = scores.reward if scores.reward is not None else implicit_rewards(scores.policy, scores.initial)
    if scores.baseline is not None:
        baseline = scores.baseline
    else:
        baseline = baseline_rewards(scores.previous, scores.initial, scores.lengths, round1_baseline)
    c = consistency_rate(rewards, baseline, measure=measure, granularity=granularity)
    pairs = select_pairs(rewards, c)
    stats = round_statistics(rewards, baseline)  # fully tied prompts are left out (see round_statistics)
    c_pairs = pairs.consistency
    lengths = scores.lengths.double()
    idx = pairs.prompt_index
    chosen_len = lengths[idx, pairs.chosen_index] if pairs.num_pairs else torch.zeros(0, dtype=torch.float64)
    rejected_len = lengths[idx, pairs.rejected_index] if pairs.num_pairs else torch.zeros(0, dtype=torch.float64)
    margins = (
        (rewards[idx, pairs.chosen_index] - rewards[idx, pairs.rejected_index]).double()
        if pairs.num_pairs
        else torch.zeros(0, dtype=torch.float64)
    )
    num_prompts = rewards.shape[0]
    metrics = {
        "consistency": c_pairs.mean().item() if pairs.num_pairs else float(c.mean()),
        "consistency_dataset": float(consistency_rate(rewards, baseline, measure=measure, granularity="dataset")),
        "kendall_tau_mean": _or_nan(stats["kendall_tau"]["mean"]),
        "kendall_tau_std": _or_nan(stats["kendall_tau"]["std"]),
        "spearman_mean": _or_nan(stats["spearman"]["mean"]),
        "spearman_std": _or_nan(stats["spearman"]["std"]),
        "toporder_mean": _or_nan(stats["top_order"]["mean"]),
        "frac_tau_negative": _or_nan(stats["frac_tau_negative"]),
        "num_tau_undefined": stats["num_undefined"],
        "num_prompts": num_prompts,
        "num_candidates": int(rewards.numel()),
        "num_pairs": pairs.num_pairs,
        "num_tied_skipped": pairs.num_tied,
        "reward_margin_mean": _mean_std(margins)[0],
        "chosen_length_mean": _mean_std(chosen_len)[0],
        "rejected_length_mean": _mean_std(rejected_len)[0],
        "completion_length_mean": lengths.mean().item(),
        **scores.reward_metrics,
    }
    return RoundLabels(rewards=rewards, baseline=baseline, consistency=c, pairs=pairs, metrics=metrics)
