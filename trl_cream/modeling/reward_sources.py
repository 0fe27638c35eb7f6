"""Where the ranking reward ``r`` and the baseline reward ``r'`` come from, besides the implicit DPO reward.

CREAM ranks a round's candidates with its own implicit reward ``log π_t − log π_0`` and measures ``C`` against the
previous checkpoint's. The paper's comparisons swap either reward:

- ``reward_source="reward_model"``: an external reward model ranks the candidates (the "Oracle" baseline of
  Table 1). Any `AutoModelForSequenceClassification` with one label and its tokenizer, or a TRL-style reward
  function ``f(prompts=[...], completions=[...], **kwargs) -> list[float]``.
- ``reward_source="judge"``: LLM-as-a-judge (P-SRLM, Yuan et al. 2024): a language model (the policy itself or a
  given one) grades each response with a 5-point additive rubric and the parsed score is the reward.
- ``baseline_source="reward_model"``: the external reward model is the baseline ``r'`` that ``C`` is measured
  against (Table 3's "Oracle" BRM), instead of ``π_{t−1}``.

Pairs always come from the chosen ``r``; the DPO reference log-probs stay those of the configured reference.
The functions here take explicit values; `add_external_rewards` is the scoring phase's call-out: it decodes the
round's candidates and calls `external_rewards` with the round's prompts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..core.labelling import RoundScores
from . import sampling

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., Sequence[float]]

# Our wording of the 5-point additive rubric of Yuan et al. (2024), "Self-Rewarding Language Models", Fig. 2: one
# point per criterion met, cumulative, then a justification and a final "Score: <points>" line.
JUDGE_TEMPLATE = """Evaluate how well the response below answers the user's question, using the additive 5-point \
scale described here. Start from 0 and add points as each criterion is met:

- Add 1 point if the response is relevant and gives some information related to the question, even if it is \
incomplete or contains some irrelevant content.
- Add a 2nd point if the response addresses a substantial part of the question, but does not fully resolve it \
or give a direct answer.
- Add a 3rd point if the response answers the basic elements of the question in a useful way, even if it reads \
like a search result or is not written from an assistant's perspective.
- Add a 4th point if the response is clearly written from an AI assistant's perspective, addresses the question \
directly and completely, and is well organised and helpful, with at most minor room for improvement in clarity, \
conciseness or focus.
- Add a 5th point if the response is impeccably tailored to the question, with no extraneous information, and \
shows expert knowledge in a high-quality, engaging and insightful answer.

<question>{question}</question>
<response>{response}</response>

After examining the question and the response:
- Briefly justify your total score in up to 100 words.
- Conclude with the score on its own line, in the format: "Score: <total points>"."""

JUDGE_FAILURE_SCORE = -1.0  # below every valid score (0-5): a response the judge could not grade ranks last
_SCORE_LABEL = re.compile(r"score\s*(?:[:=]|is|of)\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*5|out\s+of\s+5)?", re.IGNORECASE)
_FRACTION = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:/\s*5|out\s+of\s+5)\b", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*\.?\s*$")


def parse_judge_score(text: str | None, max_score: float = 5.0) -> float | None:
    """The score a judgement settles on, or `None` when none can be read.

    In order: the last ``"Score: X"`` (also ``"score is X"``, ``"Score: X/5"``, ``"**Score:** X"``), so that a
    judge that revises itself is read at its final word; else the last ``"X/5"`` or ``"X out of 5"``; else a
    judgement that is just a number (``"4.5"``). A score outside ``[0, max_score]`` is not a score (`None`).
    """
    if not text:
        return None
    for pattern in (_SCORE_LABEL, _FRACTION, _BARE):
        matches = pattern.findall(text)
        if matches:
            value = float(matches[-1])
            return value if 0.0 <= value <= max_score else None
    return None


def _messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def prompt_text(prompt: Any) -> str:
    """The last user turn of a prompt (a string or chat messages), as plain text."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])


@torch.no_grad()
def reward_model_scores(
    reward_model: torch.nn.Module | RewardFunction,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Any],
    completions: Sequence[Sequence[str]],
    batch_size: int = 16,
    max_length: int = 1024,
    show_progress: bool = True,
    desc: str = "reward model",
) -> torch.Tensor:
    """``[num_prompts, N]`` rewards of every completion from a reward model or a TRL-style reward function.

    A sequence-classification model (one label) reads each (prompt, completion) as a conversation through its own
    tokenizer's chat template (the prompt's messages + the completion as the assistant turn), or as the prompt
    text followed by the completion when the tokenizer has no template; longer texts keep their first
    ``max_length`` tokens. A plain callable gets ``prompts=`` and ``completions=`` (one entry per candidate, in the
    prompts' own format: strings, or messages with the completion as an assistant message) and returns floats.
    """
    flat_prompts = [p for p, cands in zip(prompts, completions, strict=True) for _ in cands]
    flat_completions = [c for cands in completions for c in cands]
    shape = (len(completions), len(completions[0]) if completions else 0)
    if not isinstance(reward_model, torch.nn.Module):
        conversational = [not isinstance(p, str) for p in flat_prompts]
        as_completions = [
            [{"role": "assistant", "content": c}] if conv else c
            for c, conv in zip(flat_completions, conversational, strict=True)
        ]
        values = reward_model(prompts=flat_prompts, completions=as_completions)
        if len(values) != len(flat_completions):
            raise ValueError(
                f"The reward function returned {len(values)} rewards for {len(flat_completions)} completions."
            )
        return torch.tensor([float(v) for v in values], dtype=torch.float32).view(shape)
    if tokenizer is None:
        raise ValueError("A reward model needs its tokenizer: pass `reward_processing_class=`.")
    if getattr(reward_model.config, "num_labels", 1) != 1:
        raise ValueError(
            f"The reward model has num_labels={reward_model.config.num_labels}; a reward model scores with one label."
        )
    texts = []
    for prompt, completion in zip(flat_prompts, flat_completions, strict=True):
        if tokenizer.chat_template:
            messages = [*_messages(prompt), {"role": "assistant", "content": completion}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append(f"{prompt_text(prompt)}\n{completion}")
    device = next(reward_model.parameters()).device
    scores = []
    with sampling.eval_mode(reward_model):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not show_progress):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt", add_special_tokens=not tokenizer.chat_template,
            ).to(device)  # fmt: skip
            scores.append(reward_model(**batch).logits[:, 0].float().cpu())
    return torch.cat(scores).view(shape) if scores else torch.zeros(shape)


@torch.no_grad()
def judge_scores(
    judge: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    completions: Sequence[Sequence[str]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "judge",
) -> tuple[torch.Tensor, dict[str, float], list[str]]:
    """LLM-as-a-judge rewards: each completion graded by ``judge`` (greedy) with `JUDGE_TEMPLATE`.

    A judgement with no readable score gets `JUDGE_FAILURE_SCORE` (below every valid score, so it ranks last).

    Returns:
        ``(scores [num_prompts, N], metrics, judgements)``: metrics count ``judge_parse_failures``, their rate,
        ``judge_tied_prompts`` (every candidate got the same score: no pair) and ``judge_tied_best`` (several
        candidates share the best score; the first of them is chosen).
    """
    requests = [
        [{"role": "user", "content": JUDGE_TEMPLATE.format(question=prompt_text(p), response=c)}]
        for p, cands in zip(prompts, completions, strict=True)
        for c in cands
    ]
    shape = (len(completions), len(completions[0]) if completions else 0)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=sampling.pad_token_id(tokenizer))
    ids = sampling.tokenize_prompts(tokenizer, requests)
    generated = sampling.generate_candidates(judge, tokenizer, ids, 1, config, batch_size, show_progress, desc=desc)
    judgements = [tokenizer.decode(g[0], skip_special_tokens=True) for g in generated]
    parsed = [parse_judge_score(j) for j in judgements]
    failures = sum(v is None for v in parsed)
    scores = torch.tensor([JUDGE_FAILURE_SCORE if v is None else v for v in parsed], dtype=torch.float32)
    scores = scores.view(shape)
    best = scores.max(-1).values if scores.numel() else scores
    metrics = {
        "judge_parse_failures": float(failures),
        "judge_parse_failure_rate": failures / max(len(parsed), 1),
        "judge_tied_prompts": float((scores.max(-1).values == scores.min(-1).values).sum()) if scores.numel() else 0.0,
        "judge_tied_best": float(((scores == best.unsqueeze(-1)).sum(-1) > 1).sum()) if scores.numel() else 0.0,
        "judge_score_mean": float(scores[scores >= 0].mean()) if (scores >= 0).any() else float("nan"),
    }
    logger.info(
        "Judge: %d/%d judgements unparsable, %d prompts fully tied, %d with a tied best score.",
        failures, len(parsed), int(metrics["judge_tied_prompts"]), int(metrics["judge_tied_best"]),
    )  # fmt: skip
    return scores, metrics, judgements


def check_reward_setup(
    reward_source: str, baseline_source: str, reward_model: Any | None, judge_model: Any | None
) -> None:
    """Fail before any generation when the sources and the models handed to the trainer do not match."""
    uses_rm = reward_source == "reward_model" or baseline_source == "reward_model"
    if uses_rm and reward_model is None:
        raise ValueError(
            f"reward_source={reward_source!r}, baseline_source={baseline_source!r} need a reward model: pass "
            "`reward_model=` (a sequence-classification model, with `reward_processing_class=`, or a reward function)."
        )
    if reward_model is not None and not uses_rm:
        raise ValueError(
            "A `reward_model` was passed, but neither reward_source nor baseline_source is 'reward_model', so it "
            "would be ignored; set one of them, or drop the model."
        )
    if judge_model is not None and reward_source != "judge":
        raise ValueError(
            f"A `judge_model` was passed, but reward_source={reward_source!r}; set reward_source='judge' or drop it."
        )
    if reward_model is not None and not isinstance(reward_model, torch.nn.Module) and not callable(reward_model):
        raise TypeError(f"`reward_model` must be a model or a callable, got {type(reward_model).__name__}.")


def external_rewards(
    reward_source: str,
    baseline_source: str,
    prompts: Sequence[Any],
    completions: Sequence[Sequence[str]],
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    reward_model: torch.nn.Module | RewardFunction | None = None,
    reward_tokenizer: PreTrainedTokenizerBase | None = None,
    judge_model: torch.nn.Module | None = None,
    judge_tokenizer: PreTrainedTokenizerBase | None = None,
    judge_max_new_tokens: int = 128,
    batch_size: int = 8,
    max_length: int = 1024,
    show_progress: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
    """``(r, r', metrics)`` of the non-implicit sources; `None` where the implicit reward is kept.

    The reward model scores the candidates once even when it is both ``r`` and ``r'``. The judge is
    ``judge_model`` (with ``judge_tokenizer`` or the policy's tokenizer), or the policy itself. The setup is checked
    once, before any work, by [`check_reward_setup`] (`CreamTrainer.__init__`); call it first when using this
    function on its own.
    """
    reward, baseline, metrics = None, None, {}
    if "reward_model" in (reward_source, baseline_source):
        rm = reward_model_scores(
            reward_model, reward_tokenizer, prompts, completions, batch_size, max_length, show_progress
        )
        reward = rm if reward_source == "reward_model" else None
        baseline = rm if baseline_source == "reward_model" else None
        metrics["reward_model_score_mean"] = float(rm.mean()) if rm.numel() else float("nan")
    if reward_source == "judge":
        judge = judge_model if judge_model is not None else policy
        reward, judge_metrics, _ = judge_scores(
            judge, judge_tokenizer or tokenizer, prompts, completions, judge_max_new_tokens, batch_size, show_progress
        )
        metrics.update(judge_metrics)
    return reward, baseline, metrics


@runtime_checkable
class RewardArgs(Protocol):
    """The fields [`add_external_rewards`] reads, typed as `CreamConfig` declares them (it satisfies this
    structurally)."""

    reward_source: str
    baseline_source: str
    judge_max_new_tokens: int
    scoring_batch_size: int
    max_length: int


@dataclass
class ExternalRewards:
    """The reward model and judge handed to the trainer, put on ``device`` in eval mode (models only)."""

    reward_model: torch.nn.Module | RewardFunction | None = None
    reward_tokenizer: PreTrainedTokenizerBase | None = None
    judge_model: torch.nn.Module | None = None
    judge_tokenizer: PreTrainedTokenizerBase | None = None
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        for model in (self.reward_model, self.judge_model):
            if isinstance(model, torch.nn.Module):
                (model.to(self.device) if self.device is not None else model).eval()


def add_external_rewards(
    scores: RoundScores,
    sources: ExternalRewards,
    args: RewardArgs,
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[Sequence[int]]],
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    show_progress: bool = True,
) -> RoundScores:
    """``scores`` with ``reward`` / ``baseline`` filled from the reward model or the judge (`external_rewards`).

    A no-op for the implicit reward with the previous-checkpoint baseline. The reward model and the judge see the
    round's prompts as given (``prompts``, strings or chat messages) and the decoded candidates.

    Args:
        scores: the round's log-probs.
        sources: the reward model / judge handed to the trainer.
        args: the `CreamConfig`, or any [`RewardArgs`] (``reward_source``, ``baseline_source``,
            ``judge_max_new_tokens``, ``scoring_batch_size``, ``max_length``).
        prompts: the round's prompts, in the order of ``candidates``.
        candidates: the round's candidate token ids, ``[num_prompts][N]``.
        policy: the (unwrapped) policy, the judge when no ``judge_model`` was given.
        tokenizer: the policy's tokenizer.
        show_progress: show progress bars.
    """
    if args.reward_source == "implicit" and args.baseline_source == "previous":
        return scores
    scores.reward, scores.baseline, scores.reward_metrics = external_rewards(
        args.reward_source, args.baseline_source, list(prompts),
        [tokenizer.batch_decode(c, skip_special_tokens=True) for c in candidates],
        policy, tokenizer, sources.reward_model, sources.reward_tokenizer,
        sources.judge_model, sources.judge_tokenizer, args.judge_max_new_tokens, args.scoring_batch_size,
        args.max_length, show_progress=show_progress,
    )  # fmt: skip
    return scores
