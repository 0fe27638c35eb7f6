"""What an evaluation of one checkpoint on one task returns, and the binomial standard error of an accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent questions: ``sqrt(p (1 - p) / n)`` (0 if n = 0)."""
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
        stderr (`float`): Binomial standard error of ``accuracy``, ``sqrt(p (1 - p) / n)``.
        accuracy_norm (`float` or `None`): Log-likelihood mode only: ``acc_norm`` (log-prob per character).
        num_correct_norm (`int` or `None`): Rows right under ``acc_norm``.
        stderr_norm (`float` or `None`): Binomial standard error of ``accuracy_norm``.
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
            self.stderr = binomial_stderr(self.accuracy, self.n)
        if self.accuracy_norm is not None and self.stderr_norm is None:
            self.stderr_norm = binomial_stderr(self.accuracy_norm, self.n)
