"""Evaluation: accuracy on benchmark tasks (Table 1), ranking consistency between checkpoints (Table 2), answer
extraction and the report (Markdown, JSON, PNG)."""

from .harness import (
    EvaluationResults,
    ModelOrPath,
    TaskResult,
    consistency_stats,
    evaluate_accuracy,
    greedy_generation_config,
    load_checkpoint,
    ranking_consistency,
    run_evaluation,
)

__all__ = [
    "EvaluationResults",
    "ModelOrPath",
    "TaskResult",
    "consistency_stats",
    "evaluate_accuracy",
    "greedy_generation_config",
    "load_checkpoint",
    "ranking_consistency",
    "run_evaluation",
]
