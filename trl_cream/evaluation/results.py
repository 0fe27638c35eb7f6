"""What an evaluation of one checkpoint on one task returns, and the standard error of an accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def sample_stderr(accuracy: float, n: int) -> float:
    """lm-evaluation-harness's standard error of an accuracy over ``n`` questions: ``sqrt(p (1 - p) / (n - 1))``.

    This is the harness's ``mean_stderr`` of the 0/1 scores: their sample standard deviation (``n − 1`` in the
    denominator) divided by ``√n``. It is what `TaskResult.stderr` reports. Undefined for ``n < 2``; 0 is returned.
    """
    if n < 2:
        return 0.0
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / (n - 1))


def binomial_stderr(accuracy: float, n: int) -> float:
    """The binomial (population) standard error ``sqrt(p (1 - p) / n)`` (0 if n = 0); `sample_stderr` is the one
    reported. The two differ by the factor ``sqrt(n / (n - 1))``: 0.25 % at 200 questions."""
    if n <= 0:
        return 0.0
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


@dataclass
class TaskResult:
    """Accuracy of one checkpoint on one task.

    Attributes:
        task (`str`): Task name, e.g. ``"arc_easy"``.
        accuracy (`float`): Fraction of rows answered correctly, in ``[0, 1]`` (0 for an empty task).
        n (`int`): Number of rows evaluated.
        num_correct (`int`): Number of rows answered correctly.
        predictions (`list[dict]`): One entry per row: ``prompt``, gold ``answer``, ``completion``, extracted
            ``prediction`` and ``correct`` (log-likelihood mode: ``logprobs`` per option instead of a completion).
        mode (`str`): ``"generate"`` (greedy answer, extracted) or ``"loglikelihood"`` (option scoring).
        stderr (`float`): Standard error of ``accuracy`` as lm-evaluation-harness reports it, the sample standard
            deviation of the 0/1 scores over ``√n``: ``sqrt(p (1 - p) / (n - 1))`` (`sample_stderr`).
        accuracy_norm (`float` or `None`): Log-likelihood mode only: ``acc_norm`` (log-prob per character of the
            option's own text).
        num_correct_norm (`int` or `None`): Rows right under ``acc_norm``.
        stderr_norm (`float` or `None`): The same standard error of ``accuracy_norm``.
    """

    task: str
    accuracy: float
    n: int
    num_correct: int
    predictions: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "generate"
    stderr: float | None = None
    accuracy_norm: float | None = None
    num_correct_norm: int | None = None
    stderr_norm: float | None = None

    def __post_init__(self) -> None:
        if self.stderr is None:
            self.stderr = sample_stderr(self.accuracy, self.n)
        if self.accuracy_norm is not None and self.stderr_norm is None:
            self.stderr_norm = sample_stderr(self.accuracy_norm, self.n)
