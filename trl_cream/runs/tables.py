"""A round's two on-disk tables, built from its labels (`trl_cream.core.labelling`): ``pairs`` (one row per DPO pair,
the training set) and ``candidates`` (one row per candidate with its log-probs, rewards and ranks under both reward
models). The trainer saves them under ``rounds/round_<t>/``; `trl_cream.inspection` reads them back."""

from __future__ import annotations

import json
from typing import Any

from datasets import Dataset

from ..core.labelling import RoundLabels, RoundScores
from ..core.rewards import rank_descending

TokenIds = list[int]


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
