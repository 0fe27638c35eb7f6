"""A round's scores, labels and pairs: rewards, both rankings, ``C`` and the best/worst pairs (Algorithm 1 lines
6-12), and the two tables a round keeps, ``candidates`` (one row per candidate, with every log-prob, reward and
rank) and ``pairs`` (the preference pairs trained on, with their ``C`` and reference log-probs). Where they are
written is `trl_cream.runs`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from .consistency import consistency_rate, round_statistics
from .rewards import PairSelection, baseline_rewards, implicit_rewards, rank_descending, select_pairs

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


def pairs_dataset(
    round_index: int,
    prompt_ids: list[TokenIds],
    candidates: list[list[TokenIds]],
    scores: RoundScores,
    labels: RoundLabels,
    ref_policy: str,
) -> Dataset:
    """The round's training set: one row per pair, with the DPO reference log-probs from the scoring pass."""
    ref = scores.policy if ref_policy == "round_start" else scores.initial
    p = labels.pairs
    rows: dict[str, list[Any]] = {k: [] for k in _PAIR_COLUMNS}
    for k in range(p.num_pairs):
        j, i_pos, i_neg = int(p.prompt_index[k]), int(p.chosen_index[k]), int(p.rejected_index[k])
        rows["round"].append(round_index)
        rows["prompt_index"].append(j)
        rows["chosen_index"].append(i_pos)
        rows["rejected_index"].append(i_neg)
        rows["prompt_input_ids"].append(prompt_ids[j])
        rows["chosen_input_ids"].append(candidates[j][i_pos])
        rows["rejected_input_ids"].append(candidates[j][i_neg])
        rows["ref_chosen_logps"].append(float(ref[j, i_pos]))
        rows["ref_rejected_logps"].append(float(ref[j, i_neg]))
        rows["chosen_reward"].append(float(labels.rewards[j, i_pos]))
        rows["rejected_reward"].append(float(labels.rewards[j, i_neg]))
        rows["consistency"].append(float(p.consistency[k]))
    return Dataset.from_dict(rows)


_PAIR_COLUMNS = (
    "round",
    "prompt_index",
    "chosen_index",
    "rejected_index",
    "prompt_input_ids",
    "chosen_input_ids",
    "rejected_input_ids",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_reward",
    "rejected_reward",
    "consistency",
)


def candidates_dataset(
    prompts: list[Any],
    candidates: list[list[TokenIds]],
    completions: list[list[str]],
    scores: RoundScores,
    labels: RoundLabels,
) -> Dataset:
    """One row per candidate with its log-probs, rewards and ranks (1 = best) under both reward models."""
    rank, baseline_rank = rank_descending(labels.rewards), rank_descending(labels.baseline)
    per_prompt_c = labels.consistency.expand(labels.rewards.shape[0]) if labels.consistency.dim() == 0 else None
    rows: dict[str, list[Any]] = {k: [] for k in _CANDIDATE_COLUMNS}
    for j, cands in enumerate(candidates):
        prompt = prompts[j] if isinstance(prompts[j], str) else json.dumps(prompts[j], ensure_ascii=False)
        for i, ids in enumerate(cands):
            rows["prompt_index"].append(j)
            rows["candidate_index"].append(i)
            rows["prompt"].append(prompt)
            rows["completion"].append(completions[j][i])
            rows["completion_input_ids"].append(ids)
            rows["num_tokens"].append(int(scores.lengths[j, i]))
            rows["logp_policy"].append(float(scores.policy[j, i]))
            rows["logp_initial"].append(float(scores.initial[j, i]))
            rows["logp_previous"].append(None if scores.previous is None else float(scores.previous[j, i]))
            rows["reward"].append(float(labels.rewards[j, i]))
            rows["baseline_reward"].append(float(labels.baseline[j, i]))
            rows["rank"].append(float(rank[j, i]))
            rows["baseline_rank"].append(float(baseline_rank[j, i]))
            c = per_prompt_c[j] if per_prompt_c is not None else labels.consistency[j]
            rows["consistency"].append(float(c))
    return Dataset.from_dict(rows)


_CANDIDATE_COLUMNS = (
    "prompt_index",
    "candidate_index",
    "prompt",
    "completion",
    "completion_input_ids",
    "num_tokens",
    "logp_policy",
    "logp_initial",
    "logp_previous",
    "reward",
    "baseline_reward",
    "rank",
    "baseline_rank",
    "consistency",
)
