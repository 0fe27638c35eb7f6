"""Answer extraction for the paper's downstream tasks (Table 1): multiple-choice letters and GSM8K numbers.

All functions are pure and never raise on odd model output: they return `None` (or `False`) when no answer can be
found. Only malformed *gold* rows raise, because those are a data bug to fix, not a model failure.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

_LETTER = r"[\(\[]?([A-Za-z])[\)\]]?(?![\w'’])"
_CONNECT = (
    r"(?:\s*(?:is|was|would\s+be|should\s+be|must\s+be|will\s+be|=|:|-|–))*\s*(?:(?:option|choice|letter)\b)?\s*"
)
# Tiers, strongest first; within a tier the *last* match wins ("A is wrong, the answer is C" -> C).
_CHOICE_TIERS = (
    re.compile(r"\\boxed\{\s*" + _LETTER + r"\s*\}"),
    re.compile(r"\banswer\b" + _CONNECT + _LETTER, re.IGNORECASE),
    re.compile(r"\b(?:option|choice)\b" + _CONNECT + _LETTER, re.IGNORECASE),
    re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?\.?\s*$"),  # the whole text is a letter: "B", "(c)", "D."
    re.compile(r"^\s*[\(\[]?([A-Za-z])(?:[\)\]]|[.:](?=\s|$))"),  # a leading letter: "B. Paris", "(C) because"
    re.compile(r"[\(\[]([A-Za-z])[\)\]]"),  # a parenthesised letter anywhere
    re.compile(r"(?<![\w'’])([A-Z])(?![\w'’])"),  # a bare capital letter anywhere
)
# A one-letter word followed by another word is prose ("a whale", "I think"), unless that word is a verb or
# conjunction that typically follows a choice letter ("A is wrong", "B and C").
_PROSE_AFTER = re.compile(r"\s+([a-z]+)")
_LETTER_VERBS = {"is", "was", "and", "or", "seems", "looks", "would", "could", "should", "must", "might", "can"}

_NUMBER = r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_TIERS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"answer\s*(?:is|:|=)\s*(?:[:=]\s*)?(" + _NUMBER + ")", re.IGNORECASE),
    re.compile("(" + _NUMBER + ")"),
)


def _is_prose(text: str, start: int, end: int) -> bool:
    """Whether the single letter ``text[start:end]`` is the English word "a"/"A"/"I" used in a sentence."""
    if text[start:end] not in {"a", "A", "I", "i"}:
        return False
    follower = _PROSE_AFTER.match(text, end)
    return follower is not None and follower.group(1) not in _LETTER_VERBS


def extract_choice(text: str | None, num_choices: int) -> str | None:
    """The multiple-choice letter a completion settles on, upper-cased, or `None` if none is found.

    Patterns are tried from the most to the least explicit: ``\\boxed{B}``; an "answer" phrase ("The answer is
    B.", "Answer: d"); an "option"/"choice" phrase ("I think it's option C"); the whole text being a letter ("B",
    "**A**"); a leading letter ("B. Paris", "(C) because ..."); a parenthesised letter; a bare capital letter.
    Within one pattern the last match wins, so "A is wrong, the answer is C" gives C. Letters beyond
    ``num_choices`` are ignored, and the words "a"/"I" in prose ("a whale is a mammal") are never taken as a choice.

    Args:
        text (`str` or `None`): The model's completion.
        num_choices (`int`): Number of options; valid letters are the first ``num_choices`` of the alphabet.

    Returns:
        `str` or `None`: e.g. ``"C"``.
    """
    if not text:
        return None
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be between 1 and 26, got {num_choices}; check the eval row.")
    valid = string.ascii_uppercase[:num_choices]
    clean = re.sub(r"\*\*|__|`", "", text)
    for pattern in _CHOICE_TIERS:
        for match in reversed(list(pattern.finditer(clean))):
            letter = match.group(1)
            if letter.upper() in valid and not _is_prose(clean, match.start(1), match.end(1)):
                return letter.upper()
    return None


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: ``"$1,234.50"`` -> ``"1234.5"``, ``"−3.0"`` -> ``"-3"``; `None` if invalid."""
    raw = re.sub(r"[\s$,]", "", str(text)).replace("−", "-").rstrip(".")
    try:
        value = Decimal(raw)
        if not value.is_finite():
            return None
        if value == 0:
            return "0"
        if value == value.to_integral_value():
            return str(value.quantize(Decimal(1)))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f")


def extract_number(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K-style completion, normalised (see `normalize_number`), or `None`.

    Preference order: the last ``#### N``; the last ``\\boxed{N}``; the last "The answer is N"; the last number in
    the text. Thousands separators, ``$`` signs, negative numbers, decimals and a trailing period are handled:
    ``"The answer is $1,234."`` -> ``"1234"``, ``"3.50"`` -> ``"3.5"``.
    """
    if not text:
        return None
    for pattern in _NUMBER_TIERS:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    return None


def numbers_equal(a: str | float | int | None, b: str | float | int | None) -> bool:
    """Whether two numbers are numerically equal (``"3.50" == "3.5"``, ``"1,234" == "1234"``); `None` never is."""
    if a is None or b is None:
        return False
    x, y = normalize_number(str(a)), normalize_number(str(b))
    return x is not None and x == y


_REQUIRED_KEYS = ("task", "prompt", "answer", "kind")


def gold_choice(answer: str, num_choices: int) -> str:
    """The gold letter of a multiple-choice row; 1-based digits (ARC's "1"-"4", SIQA's "1"-"3") become letters."""
    label = str(answer).strip().upper()
    if label.isdigit() and 1 <= int(label) <= num_choices:
        return string.ascii_uppercase[int(label) - 1]
    if len(label) == 1 and label in string.ascii_uppercase[:num_choices]:
        return label
    raise ValueError(
        f"Gold answer {answer!r} is not one of the {num_choices} choice letters "
        f"{string.ascii_uppercase[:num_choices]!r} (or a 1-based digit); fix the eval set's 'answer' column."
    )


def predict(row: Mapping[str, Any], completion: str) -> str | None:
    """The answer extracted from ``completion`` for an eval row: a letter for ``"mc"``, a number for ``"gsm8k"``."""
    missing = [key for key in _REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(
            f"Eval row is missing {missing}; rows need {list(_REQUIRED_KEYS)} (+ 'num_choices' for kind 'mc'). "
            f"Got keys {sorted(row)}."
        )
    if row["kind"] == "mc":
        if not isinstance(row.get("num_choices"), int):
            raise ValueError(f"Multiple-choice row needs an integer 'num_choices', got {row.get('num_choices')!r}.")
        return extract_choice(completion, row["num_choices"])
    if row["kind"] == "gsm8k":
        return extract_number(completion)
    raise ValueError(f"Unknown eval row kind {row['kind']!r} (task {row['task']!r}); use 'mc' or 'gsm8k'.")


def is_correct(row: Mapping[str, Any], completion: str) -> bool:
    """Exact-match correctness of ``completion`` for a row ``{"task", "prompt", "answer", "kind", "num_choices"}``.

    ``"mc"`` rows compare the extracted letter with the gold letter; ``"gsm8k"`` rows compare numbers numerically,
    and the gold ``answer`` may be either the short number or a full solution ending in ``#### N``.
    """
    prediction = predict(row, completion)
    if prediction is None:
        return False
    if row["kind"] == "mc":
        return prediction == gold_choice(row["answer"], row["num_choices"])
    return numbers_equal(prediction, extract_number(str(row["answer"])))
