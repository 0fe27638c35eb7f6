"""What a user sees of each round: one console line, a final table, and a warning when a round learnt nothing.

The trainer calls these once per round; the CLI and the recipes print `rounds_table` at the end. ``metrics.json``
gets the same tidy numbers (each timing once, floats to 6 significant digits).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("generate", "score", "pair", "train", "save")
REUSED = "reused"  # what a phase a resume loaded instead of running is marked as

# The paper, as cited on every model card (TRL's ``_paper``).
CITATION = """\
@inproceedings{wang2025cream,
    title        = {{CREAM: Consistency Regularized Self-Rewarding Language Models}},
    author       = {Zhaoyang Wang and Weilei He and Zhiyuan Liang and Xuchao Zhang and Chetan Bansal and Ying Wei
                    and Weitong Zhang and Huaxiu Yao},
    year         = 2025,
    booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
}"""


class LearningRateProbe(TrainerCallback):
    """Records the optimizer steps of a round and the largest learning rate any of them used."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.max_lr: float | None = None

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.steps += 1
        if optimizer is not None:
            lr = max(float(group["lr"]) for group in optimizer.param_groups)
            self.max_lr = lr if self.max_lr is None else max(self.max_lr, lr)


def no_op_reason(metrics: dict[str, Any], probe: LearningRateProbe | None = None) -> str | None:
    """Why a round's training left the policy as it was, or None if it learnt something."""
    if metrics.get("num_pairs", 1) == 0:
        tied = metrics.get("num_tied_skipped")
        return (
            f"no preference pair: all {tied if tied is not None else 'the'} prompts' candidates are tied (equal "
            "rewards), e.g. because the policy still equals π_0 or the candidates are identical"
        )
    if metrics.get("train_steps", 1) == 0:
        return "0 optimizer steps ran (fewer pairs than one batch with dataloader_drop_last, or max_steps=0)"
    if probe is not None and probe.steps > 0 and probe.max_lr == 0.0:
        return (
            f"all {probe.steps} optimizer step(s) ran at learning rate 0 (check learning_rate and the warm-up / "
            "lr_scheduler_type)"
        )
    return None


def flag_no_op(t: int, metrics: dict[str, Any], probe: LearningRateProbe | None = None) -> None:
    """Mark a round that learnt nothing in its metrics (``no_op``: the reason) and warn once."""
    reason = no_op_reason(metrics, probe)
    if reason is not None:
        metrics["no_op"] = reason
        logger.warning("CREAM round %d learnt nothing, the policy is kept as it was: %s.", t, reason)


def tidy(value: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits (recursively), for metrics.json and the console."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: tidy(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v, digits) for v in value]
    return value


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def round_line(metrics: dict[str, Any], num_rounds: int | None = None) -> str:
    """One line per round: C, τ mean ± std, pairs / tied prompts, loss, seconds per phase (or "reused")."""
    t = metrics.get("round", "?")
    reused = set(metrics.get("reused_phases", []))
    times = ", ".join(
        f"{p} {REUSED if p in reused else _num(metrics.get(f'time_{p}_s'), '.1f') + ' s'}" for p in PHASES
    )
    line = (
        f"CREAM round {t}{f'/{num_rounds}' if num_rounds else ''}: "
        f"C {_num(metrics.get('consistency'), '.3f')} | "
        f"τ {_num(metrics.get('kendall_tau_mean'), '.3f')} ± {_num(metrics.get('kendall_tau_std'), '.3f')} | "
        f"pairs {_num(metrics.get('num_pairs'), 'd')} / tied {_num(metrics.get('num_tied_skipped'), 'd')} | "
        f"loss {_num(metrics.get('train_loss'), '.4f')} ({_num(metrics.get('train_steps'), 'd')} steps) | {times}"
    )
    if metrics.get("no_op"):
        line += f" | LEARNT NOTHING: {metrics['no_op']}"
    return line
