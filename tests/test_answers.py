"""Answer extraction: multiple-choice letters, GSM8K numbers and row-level correctness."""

from __future__ import annotations

import pytest

from trl_cream.evaluation.answers import (
    extract_choice,
    extract_number,
    gold_choice,
    is_correct,
    normalize_number,
    numbers_equal,
)


@pytest.mark.parametrize(
    ("text", "num_choices", "expected"),
    [
        ("The answer is B.", 4, "B"),
        ("B", 4, "B"),
        ("b", 4, "B"),
        ("D.", 4, "D"),
        ("(c)", 4, "C"),
        ("(C) because plants need light.", 4, "C"),
        ("Answer: d", 4, "D"),
        ("answer is a", 4, "A"),
        ("**A**", 4, "A"),
        ("The answer is: **B**", 4, "B"),
        ("I think it's option C", 4, "C"),
        ("The correct choice is (D).", 4, "D"),
        ("B. Paris", 4, "B"),
        ("C) 42", 4, "C"),
        ("A is wrong, the answer is C", 4, "C"),
        ("The answer is C. Option A is wrong.", 4, "C"),
        ("It's E, no wait, the answer is B", 5, "B"),
        ("The correct answer is not A but C", 4, "C"),
        ("a whale is a mammal, so the answer is D", 4, "D"),
        ("A whale is a mammal, so D", 4, "D"),
        ("The answer is (B) Paris", 4, "B"),
        ("\\boxed{C}", 4, "C"),
        ("Between (A) and (C), I pick (C)", 4, "C"),
        ("Answer:\nB", 4, "B"),
        # letters beyond num_choices are ignored
        ("The answer is E", 4, None),
        ("The answer is E, otherwise B", 4, "B"),
        ("The answer is H", 4, None),
        # nothing to find
        ("", 4, None),
        ("A whale is a mammal.", 4, None),
        ("The answer is a whale", 4, None),
        ("I think so", 10, None),
        ("Paris is the capital of France", 4, None),
    ],
)
def test_extract_choice(text: str, num_choices: int, expected: str | None) -> None:
    assert extract_choice(text, num_choices) == expected


def test_extract_choice_rejects_bad_num_choices() -> None:
    with pytest.raises(ValueError, match="num_choices"):
        extract_choice("A", 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 72", "72"),
        ("She sells 48 clips, then 24.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### 12 and later 3", "12"),
        ("The answer is $5.", "5"),
        ("The answer is 42. Check: 40 + 2 = 42, 1 more", "42"),
        ("The final answer is: 18", "18"),
        ("\\boxed{18}", "18"),
        ("It costs $1,234.50 in total", "1234.5"),
        ("costs 3.50 dollars", "3.5"),
        ("The temperature drops to -3 degrees", "-3"),
        ("−7", "-7"),
        ("1.0", "1"),
        ("The answer is -0", "0"),
        ("pages 3-5", "5"),
        ("x = 10 - 4", "4"),
        ("It is 1,2,3", "3"),
        ("12,345,678.90", "12345678.9"),
        ("He ended with 7.", "7"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("3.50", "3.5", True),
        ("1,234", "1234", True),
        ("$5", "5.0", True),
        ("-2", "-2.00", True),
        (7, "7", True),
        ("0.1", "0.10000", True),
        ("3", "4", False),
        ("abc", "abc", False),
        (None, "1", False),
        ("1", None, False),
    ],
)
def test_numbers_equal(a: str | int | None, b: str | None, equal: bool) -> None:
    assert numbers_equal(a, b) is equal


def test_normalize_number_invalid() -> None:
    assert normalize_number("twelve") is None
    assert normalize_number("nan") is None


def mc_row(answer: str = "B", num_choices: int = 4) -> dict:
    return {"task": "arc", "prompt": "Q?\nA. x\nB. y", "answer": answer, "kind": "mc", "num_choices": num_choices}


def gsm_row(answer: str = "Some work.\n#### 1,200") -> dict:
    return {"task": "gsm8k", "prompt": "How many?", "answer": answer, "kind": "gsm8k", "num_choices": 0}


@pytest.mark.parametrize(
    ("row", "completion", "correct"),
    [
        (mc_row(), "The answer is B.", True),
        (mc_row(), "answer: b", True),
        (mc_row(), "The answer is C.", False),
        (mc_row(), "I don't know", False),
        (mc_row(answer="2"), "B", True),  # 1-based digit labels (ARC, SIQA) map to letters
        (mc_row(answer="b"), "(B)", True),
        (gsm_row(), "So the total is 1200.", True),
        (gsm_row(), "#### 1,200.00", True),
        (gsm_row("1200"), "The answer is $1,200.", True),
        (gsm_row(), "The answer is 1201.", False),
        (gsm_row(), "I cannot tell", False),
    ],
)
def test_is_correct(row: dict, completion: str, correct: bool) -> None:
    assert is_correct(row, completion) is correct


def test_gold_choice() -> None:
    assert gold_choice("1", 4) == "A"
    assert gold_choice(" c ", 4) == "C"
    with pytest.raises(ValueError, match="not one of the 3 choice letters"):
        gold_choice("D", 3)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"task": "x", "prompt": "p", "answer": "A"}, "missing"),
        ({**mc_row(), "kind": "open"}, "Unknown eval row kind 'open'"),
        ({**mc_row(), "num_choices": None}, "num_choices"),
    ],
)
def test_is_correct_rejects_malformed_rows(row: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        is_correct(row, "A")
