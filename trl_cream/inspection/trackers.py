"""The completions table of a round in the trackers (`log_completions`, named as in TRL's `GRPOConfig`).

With ``log_completions=True`` every round logs one table, at the round's step, to each tracker of ``report_to`` that
takes tables: a W&B table and a Trackio table (from the same `pandas.DataFrame`, as TRL's GRPO trainer logs its
completions), and TensorBoard text (a Markdown table, which TensorBoard's text tab renders). One row per prompt:
the prompt, each candidate with its reward and rank under π_t and under the baseline model (π_{t−1}; round 1: π_0's
likelihood), the chosen and rejected candidate, the prompt's τ and C, and the C the loss used.
``num_completions_to_print`` prints the first rows on the console (main process, with `rich`). Off by default, and
then nothing is computed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..core.labelling import RoundScores, label_round
from ..runs.tables import candidates_dataset
from .rounds import PromptRow, prompt_rows, unique_prompts

TABLE_KEY = "cream/completions"
# The integrations that take a table, and how each wants it.
_TABLE_CALLBACKS = ("WandbCallback", "TrackioCallback", "TensorBoardCallback")


def completions_frame(rows: list[PromptRow], step: int) -> pd.DataFrame:
    """One row per prompt; candidate ``i``'s columns are ``completion_i``, ``reward_i``, ``baseline_reward_i``,
    ``rank_i`` and ``baseline_rank_i`` (rank 1 = best)."""
    records = []
    for row in rows:
        record: dict[str, Any] = {"step": step, "round": row.round, "prompt_index": row.prompt_index,
                                  "prompt": row.prompt}  # fmt: skip
        for c in row.candidates:
            record.update({
                f"completion_{c.index}": c.completion, f"reward_{c.index}": c.reward,
                f"baseline_reward_{c.index}": c.baseline_reward, f"rank_{c.index}": c.rank,
                f"baseline_rank_{c.index}": c.baseline_rank,
            })  # fmt: skip
        record.update(chosen=row.chosen, rejected=row.rejected, tau=row.tau, consistency=row.consistency,
                      loss_consistency=row.loss_consistency)  # fmt: skip
        records.append(record)
    return pd.DataFrame.from_records(records)


def completions_markdown(rows: list[PromptRow], t: int) -> str:
    """The table as Markdown (TensorBoard's text tab): one row per prompt, its candidates best first under π_t."""
    baseline = "π_0 baseline" if t == 1 else "π_{t−1}"
    lines = [
        f"Round {t}: candidates best first under π_t; r = reward under π_t, r′ = under {baseline}, #k = rank under "
        "each (1 = best). ✓ chosen, ✗ rejected, ≠ the two models rank it differently.",
        "",
        "| prompt | τ | C | C in the loss | candidates |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for c in row.by_rank():
            mark = "✓ " if c.index == row.chosen else "✗ " if c.index == row.rejected else ""
            mark += "≠ " if c.disagrees else ""
            cells.append(
                f"{mark}[{c.index}] r={c.reward:.3g} (#{c.rank:g}), "
                f"r′={c.baseline_reward:.3g} (#{c.baseline_rank:g}): {_cell(c.completion)}"
            )
        loss_c = "— (tied)" if row.loss_consistency is None else f"{row.loss_consistency:.3f}"
        lines.append(
            f"| {_cell(row.prompt)} | {_num(row.tau)} | {_num(row.consistency)} | {loss_c} | {'<br>'.join(cells)} |"
        )
    return "\n".join(lines)


def log_completions(trainer: Any, t: int, samples: Any, scores: RoundScores, pairs: Any, step: int) -> None:
    """The trainer's hook, once a round is labelled: with ``log_completions``, build round ``t``'s table (the same
    labels as the round's, from its scores) and log it. Returns at once when ``log_completions`` is off, and on every
    process but the main one."""
    args = trainer.args
    if not args.log_completions or not trainer.accelerator.is_main_process:
        return
    labels = label_round(scores, args.consistency_measure, args.consistency_granularity, args.round1_baseline)
    decode = trainer.processing_class.batch_decode
    completions = [decode(c, skip_special_tokens=True) for c in samples.candidates]
    table = candidates_dataset(samples.prompts, samples.candidates, completions, scores, labels)
    log_round_completions(trainer, t, prompt_rows(t, table, pairs, args.consistency_measure), step)


def log_round_completions(trainer: Any, t: int, rows: list[PromptRow], step: int) -> None:
    """Send round ``t``'s table to the trackers at the run's ``step`` and print its first rows (main process)."""
    args = trainer.args
    if args.log_unique_prompts:
        rows = unique_prompts(rows)
    frame = completions_frame(rows, step)
    for callback in trainer.callback_handler.callbacks:
        callback = getattr(callback, "integration", callback)  # held in `trainer.run_log.RunEndDeferred`
        name = type(callback).__name__
        if name not in _TABLE_CALLBACKS:
            continue
        if name == "TensorBoardCallback":
            value: Any = completions_markdown(rows, t)
        else:  # W&B and Trackio have a Table type of the same shape, as TRL's GRPO trainer uses them
            module = getattr(callback, "_wandb" if name == "WandbCallback" else "_trackio", None)
            if module is None:
                continue
            value = module.Table(dataframe=frame)
        with trainer.at_run_step(step):
            callback.on_log(trainer.args, trainer.state, trainer.control, model=trainer.model, logs={TABLE_KEY: value})
    if args.num_completions_to_print != 0:
        print_completions(rows, t, args.num_completions_to_print)


def print_completions(rows: list[PromptRow], t: int, limit: int | None) -> None:
    """The first ``limit`` rows (all if `None`) as a `rich` table, when `rich` is installed (as TRL does)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    shown = rows if limit is None else rows[:limit]
    table = Table(title=f"CREAM round {t}: completions ({len(shown)} of {len(rows)} prompts)", show_lines=True)
    for column in ("prompt", "candidates, best first under π_t: r (#rank) | r′ (#rank)", "τ", "C", "C in loss"):
        table.add_column(column)
    for row in shown:
        lines = []
        for c in row.by_rank():
            mark = "✓" if c.index == row.chosen else "✗" if c.index == row.rejected else " "
            lines.append(
                f"{mark}{'≠' if c.disagrees else ' '} [{c.index}] {c.reward:.3g} (#{c.rank:g}) | "
                f"{c.baseline_reward:.3g} (#{c.baseline_rank:g}): {_short(c.completion)}"
            )
        loss_c = "tied" if row.loss_consistency is None else f"{row.loss_consistency:.3f}"
        table.add_row(_short(row.prompt), "\n".join(lines), _num(row.tau), _num(row.consistency), loss_c)
    Console().print(table)


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"
