"""A round seen prompt by prompt: each prompt's candidates ranked under both models, the pair trained on and the C the
loss used. Built from the round's ``candidates`` table (`trl_cream.runs.tables.candidates_dataset`) and ``pairs``
table, whether they come from memory (the trackers, during training) or from ``rounds/round_<t>/`` (the page).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from ..core.consistency import MEASURES, kendall_tau, per_prompt_consistency

_CANDIDATE_FIELDS = ("prompt_index", "candidate_index", "prompt", "completion", "num_tokens", "reward",
                     "baseline_reward", "rank", "baseline_rank")  # fmt: skip
_PAIR_FIELDS = ("prompt_index", "chosen_index", "rejected_index", "consistency")


@dataclass
class Candidate:
    """One candidate of a prompt: its text and length, its reward and rank (1 = best) under each model."""

    index: int
    completion: str
    num_tokens: int
    reward: float
    baseline_reward: float
    rank: float
    baseline_rank: float

    @property
    def disagrees(self) -> bool:
        """Ranked differently by the two models."""
        return self.rank != self.baseline_rank


@dataclass
class PromptRow:
    """One prompt of a round.

    Attributes:
        consistency: the prompt's own C, ``per_prompt_consistency`` under the run's measure (``(τ + 1) / 2`` for
            `"kendall"`, and for `"none"`, SRLM, whose loss uses C = 1); `nan` where undefined. With
            ``consistency_granularity="dataset"`` the loss used the round's mean instead (``loss_consistency``).
        tau: Kendall's τ-b between the two rankings of its candidates (`nan` when a ranking is all ties).
        loss_consistency: the C the loss weighted its pair with; `None` when it has no pair (all candidates tied).
        chosen, rejected: the candidate indices of its pair, or `None`.
    """

    round: int
    prompt_index: int
    prompt: str
    consistency: float
    tau: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: int | None = None
    rejected: int | None = None
    loss_consistency: float | None = None

    @property
    def margin(self) -> float | None:
        """r(chosen) − r(rejected) under π_t, or `None` without a pair."""
        if self.chosen is None or self.rejected is None:
            return None
        return self.candidates[self.chosen].reward - self.candidates[self.rejected].reward

    @property
    def num_disagreements(self) -> int:
        """Candidates whose rank differs between the two models."""
        return sum(c.disagrees for c in self.candidates)

    def by_rank(self) -> list[Candidate]:
        """The candidates best first under π_t (ties: by index)."""
        return sorted(self.candidates, key=lambda c: (c.rank, c.index))


def prompt_rows(t: int, candidates: Dataset, pairs: Dataset | None, measure: str = "kendall") -> list[PromptRow]:
    """The round's prompts, in prompt order, from its ``candidates`` and ``pairs`` tables; ``measure`` is the run's
    `consistency_measure`."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown consistency measure {measure!r}; choose one of {MEASURES}.")
    table = candidates.select_columns(list(_CANDIDATE_FIELDS)).to_dict()
    rows: dict[int, PromptRow] = {}
    for k, j in enumerate(table["prompt_index"]):
        row = rows.get(j)
        if row is None:
            row = rows[j] = PromptRow(t, j, readable_prompt(table["prompt"][k]), math.nan, math.nan)
        row.candidates.append(
            Candidate(
                index=table["candidate_index"][k], completion=table["completion"][k],
                num_tokens=table["num_tokens"][k], reward=table["reward"][k],
                baseline_reward=table["baseline_reward"][k], rank=table["rank"][k],
                baseline_rank=table["baseline_rank"][k],
            )
        )  # fmt: skip
    ordered = [rows[j] for j in sorted(rows)]
    for row in ordered:
        row.candidates.sort(key=lambda c: c.index)
    _add_consistency(ordered, "kendall" if measure == "none" else measure)
    if pairs is not None and len(pairs):
        paired = pairs.select_columns(list(_PAIR_FIELDS)).to_dict()
        for j, pos, neg, c in zip(*(paired[name] for name in _PAIR_FIELDS)):
            if j in rows:
                rows[j].chosen, rows[j].rejected, rows[j].loss_consistency = pos, neg, float(c)
    return ordered


def readable_prompt(prompt: str) -> str:
    """A prompt as a reader wants it: a chat prompt (saved as JSON messages) as its messages' text, one per line with
    its role when there are several; a plain prompt as it is."""
    if not prompt.startswith("["):
        return prompt
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        return prompt
    if len(messages) == 1:
        return str(messages[0]["content"])
    return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in messages)


def _add_consistency(rows: list[PromptRow], measure: str) -> None:
    """Kendall's τ-b and the C of each prompt, with the library's own definitions (`trl_cream.core.consistency`)."""
    sizes = {len(r.candidates) for r in rows}
    for size in sizes:
        group = [r for r in rows if len(r.candidates) == size]
        reward = torch.tensor([[c.reward for c in r.candidates] for r in group], dtype=torch.float64)
        baseline = torch.tensor([[c.baseline_reward for c in r.candidates] for r in group], dtype=torch.float64)
        taus, cs = kendall_tau(reward, baseline).tolist(), per_prompt_consistency(reward, baseline, measure).tolist()
        for row, tau, c in zip(group, taus, cs):
            row.tau, row.consistency = tau, c


def unique_prompts(rows: list[PromptRow]) -> list[PromptRow]:
    """The first row of each distinct prompt text (TRL's ``log_unique_prompts``)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.prompt not in seen:
            seen.add(row.prompt)
            kept.append(row)
    return kept
