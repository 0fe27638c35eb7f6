"""Datasets in and out of the trainer: prompt and SFT dataset checks, the round split and the pair collator. A
round's two tables (``pairs``, ``candidates``) are built in `trl_cream.runs.tables`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from ..modeling.scoring import pad_pairs, truncate_prompts

TokenIds = list[int]


@dataclass
class PairCollator:
    """Pads a batch of pairs: prompts left, completions right, chosen rows first, then rejected rows.

    Prompts are left-truncated to ``max_length`` exactly as in the scoring pass, so the training forward of the
    round-start policy reproduces the reference log-probs stored in the pairs.
    """

    pad_token_id: int
    max_length: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_input_ids"] for r in rows] * 2
        completions = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        prompt_ids, prompt_mask, completion_ids, completion_mask = pad_pairs(
            truncate_prompts(prompts, completions, self.max_length), completions, self.pad_token_id
        )
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "ref_chosen_logps": torch.tensor([r["ref_chosen_logps"] for r in rows]),
            "ref_rejected_logps": torch.tensor([r["ref_rejected_logps"] for r in rows]),
            "consistency": torch.tensor([r["consistency"] for r in rows]),
        }


def validate_prompts(dataset: Dataset | None, num_iterations: int) -> None:
    """Check the prompt dataset before anything is loaded or generated."""
    if dataset is None:
        raise ValueError("`train_dataset` is required: a prompt-only dataset with a `prompt` column.")
    check_dataset_type(dataset, "train_dataset")
    columns = getattr(dataset, "column_names", None) or []
    if "prompt" not in columns:
        raise ValueError(
            f"`train_dataset` needs a `prompt` column (strings or chat messages); it has {columns}. "
            "Rename your column, e.g. dataset.rename_column('question', 'prompt')."
        )
    if len(dataset) == 0:
        raise ValueError("`train_dataset` is empty: CREAM needs at least one prompt per round. Check your filters.")
    if len(dataset) < num_iterations:
        raise ValueError(
            f"num_iterations={num_iterations} is larger than the number of prompts ({len(dataset)}): every "
            "round needs at least one prompt. Lower num_iterations or add prompts."
        )
    prompts = dataset["prompt"]
    empty = [i for i, p in enumerate(prompts) if p is None or (isinstance(p, (str, list)) and not p)]
    if empty:
        raise ValueError(
            f"`train_dataset` has {len(empty)} empty prompt(s) (None, '' or []), e.g. at rows {empty[:5]}: a round "
            "would sample from no prompt. Drop them, e.g. dataset.filter(lambda row: bool(row['prompt']))."
        )
    for i, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(f"`train_dataset` row {i}: the prompt {_short(prompt)} {problem}")


def check_dataset_type(dataset: Any, name: str) -> None:
    """A `datasets.Dataset` (or anything indexable by column), not a `DatasetDict` or a streamed `IterableDataset`."""
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(dataset, (list, tuple)):
        raise TypeError(
            f"`{name}` is a plain {type(dataset).__name__} of {len(dataset)} rows; CREAM takes a `datasets.Dataset`. "
            f"Wrap it: {name}=Dataset.from_list(rows) (from datasets import Dataset)."
        )
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise TypeError(
            f"`{name}` is a {type(dataset).__name__} with splits {list(dataset)}; pass one split, e.g. "
            f"{name}=dataset[{next(iter(dataset), 'train')!r}]."
        )
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"`{name}` is an IterableDataset (streaming): CREAM shuffles and splits the prompts across rounds, so "
            "it needs them all. Load without streaming=True, or materialise it: "
            "Dataset.from_list(list(iterable_dataset))."
        )


def prompt_problem(prompt: Any) -> str | None:
    """What is wrong with one prompt (a string, or chat messages with string `role` and `content`), or `None`."""
    if isinstance(prompt, str):
        if not prompt.strip():
            return "is only whitespace: drop it, e.g. dataset.filter(lambda r: r['prompt'].strip())."
        return _utf8_problem(prompt)
    if not isinstance(prompt, list):
        return (
            f"is a {type(prompt).__name__}; a prompt is a string or a list of chat messages "
            "([{'role': 'user', 'content': '...'}]). Convert the column to strings."
        )
    if all(isinstance(m, str) for m in prompt):
        return (
            "is a list of strings, which would be tokenized as pre-split words; join it into one string "
            "(' '.join(...)) or give chat messages [{'role': 'user', 'content': '...'}]."
        )
    for k, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return (
                f"has message {k} without a string 'role' ({_short(message)}); every message needs 'role' "
                "('system', 'user' or 'assistant') and 'content'."
            )
        content = message.get("content")
        if isinstance(content, list):
            return (
                f"has message {k} whose content is a list of parts; give the text as one string, e.g. "
                "' '.join(part['text'] for part in content)."
            )
        if not isinstance(content, str):
            return f"has message {k} with content={content!r}; every message needs a string 'content'."
        if (problem := _utf8_problem(content)) is not None:
            return f"has message {k} that {problem}"
    if not any(m["content"].strip() for m in prompt):
        return "has only empty or whitespace messages: drop it."
    if all(m["role"] == "system" for m in prompt):
        return (
            "has only system message(s): there is no question for the model to answer. Add the question as a "
            "{'role': 'user', 'content': '...'} message."
        )
    return None


def _utf8_problem(text: str) -> str | None:
    """Text that cannot be encoded as UTF-8 (a lone surrogate, e.g. bytes decoded with errors='surrogateescape')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (
            f"is not valid UTF-8 (character {error.start} is {text[error.start]!r}, a lone surrogate): re-read the "
            "source with its real encoding, or clean it, e.g. text.encode('utf-8', 'replace').decode('utf-8')."
        )
    return None


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def validate_sft_dataset(dataset: Dataset) -> None:
    """An SFT dataset is conversational (`messages`) or prompt-completion (`prompt` + `completion`), as in TRL."""
    columns = getattr(dataset, "column_names", None) or []
    if "messages" not in columns and not {"prompt", "completion"} <= set(columns) and "text" not in columns:
        raise ValueError(
            f"`sft_dataset` needs a `messages` column (chat) or `prompt` and `completion` columns (or `text`); it has "
            f"{columns}."
        )
    if len(dataset) == 0:
        raise ValueError("`sft_dataset` is empty.")


def split_equally(items: list[Any], parts: int) -> Iterator[list[Any]]:
    """Split ``items`` into ``parts`` consecutive chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    start = 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        yield items[start:end]
        start = end


def check_utf8_file(path: str | Path) -> None:
    """A text data file (JSON/JSONL/CSV) that is not valid UTF-8: name the line and the byte, read line by line."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} line {number} is not valid UTF-8 (byte {line[error.start]:#04x} at column "
                    f"{error.start + 1}): re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix that row."
                ) from None
