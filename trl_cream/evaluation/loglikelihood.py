"""Log-likelihood multiple-choice scoring and its standard error, with lm-evaluation-harness's definitions.

Each option of a question is a *continuation* of the same context; the model scores every option's tokens given
the context, and nothing is generated:

- ``acc``: the option with the highest summed log-probability ``Σ_k log π(c_k | context, c_<k)`` is the prediction;
- ``acc_norm``: the option with the highest summed log-probability per character of the *option's own text* (the
  harness's ``lls / len(choice)``: the target delimiter, e.g. the leading space, is not counted), which removes the
  bias towards short options;
- the standard error of either is the harness's ``mean_stderr``: the sample standard deviation (``n − 1``) of the
  0/1 scores over ``√n``, i.e. ``sqrt(p (1 − p) / (n − 1))`` (`sample_stderr`).

The context is plain text, ``"Question: <question>\\nAnswer:"``, and each continuation is ``" <option text>"``, as
in lm-evaluation-harness's ARC/OpenBookQA tasks. With ``chat_template=True`` the context is instead the question
as one user message through the tokenizer's chat template (with the generation prompt), and the continuation is
the option text as the start of the assistant's reply (no delimiter, as the harness does under a chat template).

Requests are tokenized as the harness's ``_encode_pair`` does, in both modes: trailing whitespace of the context
moves to the continuation; the context is encoded with the tokenizer's own special tokens (so a tokenizer that adds
BOS, as Llama's, Mistral's and Gemma's do, puts BOS first), unless it already starts with that token's text (a chat
template that writes BOS itself); ``context + continuation`` is encoded the same way and the continuation is its
tail after the context's tokens.

This is the protocol that gives signal on small models: a 135M model that answers by generating a letter mostly
says the same letter, while the likelihood of each option's text still reflects what it knows. The
generate-and-extract mode of `trl_cream.evaluation.evaluate_accuracy` stays: it is the paper's protocol for 7-8B
models, and the only one for GSM8K, which has no options.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modeling import sampling, scoring
from .results import TaskResult, binomial_stderr, sample_stderr  # noqa: F401  (were defined here before 0.2)

EVAL_MODES: tuple[str, ...] = ("generate", "loglikelihood")
MC_CONTEXT = "Question: {question}\nAnswer:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def resolve_modes(
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]], eval_mode: str | Mapping[str, str]
) -> dict[str, str]:
    """Task -> ``"generate"`` or ``"loglikelihood"``.

    A single string applies to every multiple-choice task; tasks without options (GSM8K, ``kind != "mc"``) always
    use ``"generate"``. A mapping names the mode per task; unnamed tasks use ``"generate"``. Asking for
    ``"loglikelihood"`` by name on a task whose rows have no ``choices`` is an error.
    """
    modes: dict[str, str] = {}
    for task, rows in eval_sets.items():
        mode = eval_mode.get(task, "generate") if isinstance(eval_mode, Mapping) else eval_mode
        if mode not in EVAL_MODES:
            raise ValueError(f"Unknown evaluation mode {mode!r} for task {task!r}; choose one of {EVAL_MODES}.")
        has_options = len(rows) > 0 and all(row.get("kind", "mc") == "mc" and row.get("choices") for row in rows)
        if mode == "loglikelihood" and not has_options:
            if isinstance(eval_mode, Mapping):
                raise ValueError(
                    f"Task {task!r} was given eval mode 'loglikelihood', but its rows carry no `choices` (options) "
                    "to score; use 'generate' for it (e.g. GSM8K), or add a `choices` list to every row."
                )
            mode = "generate"
        modes[task] = mode
    return modes


def _prefix_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text of the harness's prefix token: BOS, or EOS for a tokenizer without one."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return tokenizer.decode([prefix_id]) if prefix_id is not None else None


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens (lm-evaluation-harness's ``tok_encode``).

    A tokenizer that adds BOS adds it here; one that does not adds nothing. Text that already starts with the BOS
    token's string (a chat template that writes it) is encoded without special tokens, so BOS is never doubled.
    """
    prefix = _prefix_text(tokenizer)
    if prefix and text.startswith(prefix):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids of one request, as lm-evaluation-harness's ``_encode_pair`` builds them.

    Trailing whitespace of the context moves to the front of the continuation; ``context`` and ``context +
    continuation`` are encoded with `encode_text` (special tokens included), and the continuation is the whole's
    tail after the context's token count, so a word that straddles the boundary is tokenized as in running text.
    In the rare case where that tail is empty (the context's last token swallowed the whole continuation), the
    continuation is encoded on its own without special tokens, so that every option has tokens to score.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode_text(tokenizer, context)
    tail = encode_text(tokenizer, context + continuation)[len(context_ids) :]
    return context_ids, tail or list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def mc_requests(
    row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, chat_template: bool = False
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """The (context ids, continuation ids, option text) of every option of one multiple-choice row.

    The option text is the choice itself, without the delimiter: what ``acc_norm`` divides by.
    """
    question, choices = str(row.get("question") or row["prompt"]).strip(), list(row["choices"])
    if chat_template:
        if not tokenizer.chat_template:
            raise ValueError("chat_template=True, but the tokenizer has no chat template; use the plain context.")
        messages = [{"role": "user", "content": question}]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        continuations = [str(c) for c in choices]
    else:
        context = MC_CONTEXT.format(question=question)
        continuations = [" " + str(c) for c in choices]
    contexts, conts = [], []
    for continuation in continuations:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        contexts.append(ctx)
        conts.append(cont)
    return contexts, conts, [str(c) for c in choices]


@torch.no_grad()
def score_options(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_length: int = 1024,
    chat_template: bool = False,
    show_progress: bool = True,
    desc: str = "options",
) -> list[list[float]]:
    """Summed log-probability of every option's continuation after its question context, per row.

    The context of a question is run once, ``batch_size`` questions per forward (left-padded, sorted by length);
    its KV cache is then repeated for each option and the right-padded continuations are scored in a second
    forward, with position ids that continue the context's. The first continuation token is predicted by the
    context's last logits. Up to numerical noise this equals scoring each ``context + option`` sequence from
    scratch (the test suite checks it against a plain full forward), at a fraction of the cost since the context
    is usually much longer than an option. Contexts longer than ``max_length`` minus the longest option are
    left-truncated.

    Returns:
        `list[list[float]]`: ``[num_rows][num_options]`` summed log-probs.
    """
    pad_id = sampling.pad_token_id(tokenizer)
    device = next(model.parameters()).device
    # One entry per distinct (row, context): the options that continue it.
    groups: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    for r, row in enumerate(rows):
        contexts, conts, _ = mc_requests(row, tokenizer, chat_template)
        by_context: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for o, (ctx, cont) in enumerate(zip(contexts, conts, strict=True)):
            by_context.setdefault(tuple(ctx), []).append((r, o, cont))
        groups += [(list(ctx), options) for ctx, options in by_context.items()]
    scores: list[list[float]] = [[math.nan] * len(row["choices"]) for row in rows]
    order = sorted(range(len(groups)), key=lambda g: len(groups[g][0]))
    with sampling.eval_mode(model):
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
            batch = [groups[g] for g in order[start : start + batch_size]]
            options = [(b, r, o, cont) for b, (_, opts) in enumerate(batch) for r, o, cont in opts]
            longest = max(len(cont) for *_, cont in options)
            contexts = [ctx[max(0, len(ctx) + longest - max_length) :] or ctx[-1:] for ctx, _ in batch]
            logps = _continuation_logps(model, contexts, [(b, cont) for b, _, _, cont in options], pad_id, device)
            for (_, r, o, _), value in zip(options, logps, strict=True):
                scores[r][o] = value
    return scores


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``"cache"`` where the model's forward takes it (transformers >= 5.24, which deprecates ``past_key_values``),
    else ``"past_key_values"`` (older transformers, or a model with its own forward)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _continuation_logps(
    model: torch.nn.Module,
    contexts: Sequence[list[int]],
    continuations: Sequence[tuple[int, list[int]]],
    pad_id: int,
    device: torch.device,
) -> list[float]:
    """Σ log-probs of each ``(context index, continuation ids)`` after its context, sharing each context's cache."""
    ctx_ids, ctx_mask = scoring.pad_pairs(contexts, [[pad_id]] * len(contexts), pad_id, device)[:2]
    positions = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    index = torch.tensor([b for b, _ in continuations], device=device)
    cache = getattr(out, "cache", None)  # transformers >= 5.24; older versions name it `past_key_values`
    cache = out.past_key_values if cache is None else cache
    cache.batch_select_indices(index)
    cont_ids, cont_mask = scoring.pad_pairs([[]] * len(continuations), [c for _, c in continuations], pad_id, device)[
        2:
    ]
    mask = torch.cat([ctx_mask[index], cont_mask], dim=1)
    cont_positions = ctx_mask.sum(-1)[index].unsqueeze(-1) + torch.arange(cont_ids.shape[1], device=device)
    logits = model(
        input_ids=cont_ids, attention_mask=mask, position_ids=cont_positions, use_cache=True,
        **{_cache_kwarg(model): cache},
    ).logits  # fmt: skip
    logits = torch.cat([out.logits[index, -1:], logits[:, :-1]], dim=1).float()
    token_logps = logits.gather(-1, cont_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * cont_mask).sum(-1).double().cpu().tolist()


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (as lm-evaluation-harness's ``np.argmax``)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_loglikelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Mapping[str, Sequence[Mapping[str, Any]]],
    batch_size: int = 16,
    max_length: int = 1024,
    chat_template: bool = False,
    show_progress: bool = True,
    desc: str = "loglikelihood",
) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` of ``model`` on each multiple-choice eval set, by option log-likelihood.

    Each row needs ``question`` (or ``prompt``), ``choices`` (the option texts, in letter order) and ``answer``
    (the gold letter ``"A"``, ``"B"``, ...). ``TaskResult.accuracy`` is ``acc`` and ``accuracy_norm`` is
    ``acc_norm`` (per character of the option's own text, without the delimiter); both come with the harness's
    standard error, `sample_stderr`.

    Returns:
        `dict[str, TaskResult]`: Task name -> result with ``mode="loglikelihood"`` and per-row predictions
        (``logprobs`` per option, ``prediction`` and ``prediction_norm`` letters).
    """
    results: dict[str, TaskResult] = {}
    for task, dataset in datasets.items():
        rows = [dict(row) for row in dataset]
        for row in rows:
            if not row.get("choices"):
                raise ValueError(f"Task {task!r}: row {row.get('prompt', row)!r:.80} has no `choices` to score.")
            if row["answer"] not in LETTERS[: len(row["choices"])]:
                raise ValueError(
                    f"Task {task!r}: gold answer {row['answer']!r} is not one of the {len(row['choices'])} option "
                    "letters."
                )
        scores = score_options(
            model, tokenizer, rows, batch_size, max_length, chat_template, show_progress, desc=f"{desc} {task}"
        )
        predictions = []
        for row, logps in zip(rows, scores, strict=True):
            per_char = [lp / max(len(str(c)), 1) for lp, c in zip(logps, row["choices"], strict=True)]
            pred, pred_norm = LETTERS[_argmax(logps)], LETTERS[_argmax(per_char)]
            predictions.append(
                {
                    "prompt": row.get("prompt", row.get("question")),
                    "answer": row["answer"],
                    "logprobs": logps,
                    "prediction": pred,
                    "prediction_norm": pred_norm,
                    "correct": pred == row["answer"],
                    "correct_norm": pred_norm == row["answer"],
                }
            )
        n = len(rows)
        num_correct = sum(p["correct"] for p in predictions)
        num_correct_norm = sum(p["correct_norm"] for p in predictions)
        results[task] = TaskResult(
            task,
            num_correct / n if n else 0.0,
            n,
            num_correct,
            predictions,
            mode="loglikelihood",
            accuracy_norm=num_correct_norm / n if n else 0.0,
            num_correct_norm=num_correct_norm,
        )
    return results
