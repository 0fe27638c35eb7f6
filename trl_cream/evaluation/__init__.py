"""Evaluation: accuracy on benchmark tasks (Table 1), ranking consistency between checkpoints (Table 2), answer
extraction and the report (Markdown, JSON, PNG)."""

from .harness import (
    EvaluationResults,
    ModelOrPath,
    TaskResult,
    evaluate_accuracy,
    greedy_generation_config,
    load_checkpoint,
    run_evaluation,
)
from .loglikelihood import EVAL_MODES, evaluate_loglikelihood, score_options
from .ranking import consistency_stats, ranking_consistency
from .results import binomial_stderr, sample_stderr

__all__ = [
    "EVAL_MODES",
    "binomial_stderr",
    "sample_stderr",
    "evaluate_loglikelihood",
    "score_options",
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
