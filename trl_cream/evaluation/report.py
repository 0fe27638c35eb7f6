"""Evaluation reports: ``results.json``, ``results.md`` (paper Tables 1 and 2) and ``results.png``.

Every function accepts a `trl_cream.evaluation.EvaluationResults` or its dict form (a reloaded ``results.json``), so
a report can be re-rendered from disk without re-running anything.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# (key in the consistency stats, column header); Spearman uses the paper's (ρ + 1) / 2 scale, see `consistency_stats`.
CONSISTENCY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("consistency", "Consistency C ↑"),
    ("kendall_tau", "Kendall τ ↑"),
    ("spearman_normalized", "Spearman (ρ+1)/2 ↑"),
    ("top_order", "TopOrder ↑"),
)


def _as_dict(results: Any) -> dict[str, Any]:
    data = results.to_dict() if hasattr(results, "to_dict") else dict(results)
    missing = [key for key in ("iterations", "accuracy", "consistency") if key not in data]
    if missing:
        raise ValueError(f"Results are missing {missing}; pass an EvaluationResults or a loaded results.json.")
    return data


def _json_safe(value: Any) -> Any:
    """Replace nan/inf with `None` (strict JSON) and stringify what json cannot encode."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _tasks(data: Mapping[str, Any]) -> list[str]:
    tasks: list[str] = []
    for iteration in data["iterations"]:
        tasks += [t for t in data["accuracy"].get(iteration, {}) if t not in tasks]
    return tasks


def _stderr(result: Mapping[str, Any], key: str = "accuracy") -> float:
    """The stored standard error, or the harness's ``sqrt(p (1 - p) / (n - 1))`` for a results.json without one."""
    stored = result.get("stderr" if key == "accuracy" else "stderr_norm")
    if stored is not None:
        return float(stored)
    p, n = float(result.get(key) or 0.0), int(result.get("n") or 0)
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def accuracy_table(results: Any, key: str = "accuracy") -> dict[str, dict[str, float]]:
    """Iteration -> task -> accuracy in percent, plus ``"Average"`` (the mean over the iteration's tasks).

    ``key="accuracy_norm"`` gives the log-likelihood tasks' ``acc_norm`` instead (tasks without it are left out).
    """
    data = _as_dict(results)
    table: dict[str, dict[str, float]] = {}
    for iteration in data["iterations"]:
        tasks = data["accuracy"].get(iteration, {}).items()
        row = {task: 100 * r[key] for task, r in tasks if r.get(key) is not None}
        if row:
            row["Average"] = sum(row.values()) / len(row)
        table[iteration] = row
    return table


def stderr_table(results: Any, key: str = "accuracy") -> dict[str, dict[str, float]]:
    """Iteration -> task -> standard error (lm-evaluation-harness's) in percentage points, plus ``"Average"``.

    The average's error treats the tasks as independent: ``sqrt(Σ se_k²) / K``.
    """
    data = _as_dict(results)
    table: dict[str, dict[str, float]] = {}
    for iteration in data["iterations"]:
        tasks = data["accuracy"].get(iteration, {}).items()
        row = {task: 100 * _stderr(r, key) for task, r in tasks if r.get(key) is not None}
        if row:
            row["Average"] = math.sqrt(sum(v * v for v in row.values())) / len(row)
        table[iteration] = row
    return table


def _task_notes(data: Mapping[str, Any]) -> str:
    """One line per task: how it was scored and on how many questions."""
    notes = []
    for task in _tasks(data):
        result = next(data["accuracy"][it][task] for it in data["iterations"] if task in data["accuracy"].get(it, {}))
        mode = result.get("mode", "generate")
        how = "option log-likelihood" if mode == "loglikelihood" else "greedy answer, extracted"
        notes.append(f"{task}: {result.get('n', 0)} questions, {how}")
    return "; ".join(notes)


def _initial_policy_note(data: Mapping[str, Any]) -> str:
    """Which checkpoint is π_0, the reference of the implicit rewards ``r = log π_k − log π_0`` of Table 2."""
    first = data["iterations"][0] if data["iterations"] else "?"
    return (
        f"π_0 (the reference of the implicit rewards r = log π_k − log π_0) is the first checkpoint, {first}: "
        "pass the base model first to score against it."
    )


def format_change(value: float | None) -> str:
    """A relative weight change for a table: ``3.2e-03``, or "–" when it was not measured."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.1e}"


def _arrow(value: float, previous: float | None, error: float, previous_error: float | None) -> str:
    """↑/↓ only for a change beyond twice its standard error, ``sqrt(se² + se_previous²)`` (the two iterations'
    accuracies taken as independent): with 50 questions a task one question moves the accuracy by 2 points, under a
    third of that, and must not read as an effect."""
    if previous is None or previous_error is None:
        return ""
    change, spread = value - previous, math.hypot(error, previous_error)
    if abs(change) <= 2 * spread:
        return ""
    return " ↑" if change > 0 else " ↓"


def _mean_std(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def render_markdown(results: Any) -> str:
    """Tables 1 and 2 as a Markdown string (also what ``results.md`` contains).

    Table 1: one row per iteration, exact-match accuracy (%) per task and on average, with ↑/↓ against the previous
    iteration (as in the paper) only where the change exceeds twice its standard error. Table 2: one row per
    consecutive pair ("M2 vs M1", ...), mean ± std over prompts.
    """
    data = _as_dict(results)
    lines = ["## Table 1: accuracy (%) ± standard error", ""]
    lines += _accuracy_lines(data, "accuracy")
    lines += ["", f"Questions per task: {_task_notes(data)}.", ""]
    if any(accuracy_table(data, "accuracy_norm").values()):
        lines += ["### Table 1b: log-likelihood tasks, acc_norm (log-prob per character of the option text) (%)", ""]
        lines += _accuracy_lines(data, "accuracy_norm")
        lines += [""]
    loglikelihood = any(
        result.get("mode") == "loglikelihood" for per_task in data["accuracy"].values() for result in per_task.values()
    )
    note = (
        "± is lm-evaluation-harness's standard error, sqrt(p(1-p)/(n-1)) (the sample std of the 0/1 scores over √n): "
        "a difference smaller than about twice it is noise. ↑/↓ mark only a change from the previous iteration beyond "
        "twice its standard error, sqrt(se² + se_previous²); a smaller change is left unmarked."
    )
    if loglikelihood:  # only when some task was scored by log-likelihood
        note = (
            "Log-likelihood tasks: `acc` = the option with the highest summed log-prob (Table 1), `acc_norm` = "
            "highest log-prob per character of the option's own text (Table 1b), as in lm-evaluation-harness. " + note
        )
    lines += [note]
    lines += ["", "## Table 2: ranking consistency between consecutive checkpoints (mean ± std over prompts)", ""]
    lines += [_initial_policy_note(data), ""]
    if not data["consistency"]:
        lines.append("_No pairs: Table 2 needs at least three checkpoints (M0, M1, M2) and consistency prompts._")
        return "\n".join(lines) + "\n"
    headers = [header for _, header in CONSISTENCY_COLUMNS] + ["Prompts (undefined)", "Weights moved ‖Δθ‖/‖θ‖"]
    lines += ["| Iterations | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for label, stats in data["consistency"].items():
        cells = [_mean_std(stats.get(key)) for key, _ in CONSISTENCY_COLUMNS]
        cells.append(f"{stats.get('num_prompts', 0)} ({stats.get('num_undefined', 0)})")
        cells.append(format_change(stats.get("weight_change")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "C = (τ + 1) / 2. Prompts whose candidates are all tied under either reward have no ranking; they are left "
        'out of every column and counted as undefined. "Weights moved" is the relative change of the trained '
        "weights (the LoRA adapter, or all weights) from the older checkpoint to the newer: C near 1 with weights "
        'that barely moved means "unchanged", not "consistent".',
    ]
    return "\n".join(lines) + "\n"


def _accuracy_lines(data: Mapping[str, Any], key: str) -> list[str]:
    table, errors = accuracy_table(data, key), stderr_table(data, key)
    tasks = [t for t in _tasks(data) + ["Average"] if any(t in row for row in table.values())]
    lines = ["| Iteration | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    previous: dict[str, float] = {}
    previous_err: dict[str, float] = {}
    for iteration in data["iterations"]:
        row, err = table[iteration], errors[iteration]
        cells = [
            f"{row[t]:.2f} ± {err[t]:.2f}{_arrow(row[t], previous.get(t), err[t], previous_err.get(t))}"
            if t in row
            else "–"
            for t in tasks
        ]
        lines.append(f"| {iteration} | " + " | ".join(cells) + " |")
        previous, previous_err = row, err
    return lines


def plot_results(results: Any, path: str | Path) -> Path:
    """Save a two-panel figure: accuracy per task per iteration, and consistency metrics per consecutive pair.

    Uses matplotlib's Agg canvas directly, so neither pyplot nor the global backend is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is an optional (demo/test) dependency
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib` (or `trl-cream[demo]`).") from error
    data = _as_dict(results)
    table, errors = accuracy_table(data), stderr_table(data)
    iterations = data["iterations"]
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, consistency_axes = figure.subplots(1, 2)
    for task in _tasks(data) + ["Average"]:
        points = [(i, table[it][task], errors[it][task]) for i, it in enumerate(iterations) if task in table[it]]
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if task == "Average" else {}
        xs, ys, es = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        accuracy_axes.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=task, **style)
    top = max([v + errors[it][t] for it, row in table.items() for t, v in row.items()], default=0.0)
    accuracy_axes.set(xticks=range(len(iterations)), xticklabels=iterations, ylabel="accuracy (%)")
    accuracy_axes.set_ylim(0, max(5.0, min(100.0, 1.15 * top)))
    accuracy_axes.set_title("Accuracy per iteration (Table 1, ± standard error)")
    accuracy_axes.legend(fontsize="small")
    pairs = list(data["consistency"])
    if pairs:
        for offset, (key, header) in enumerate(CONSISTENCY_COLUMNS):
            stats = [data["consistency"][p].get(key) or {} for p in pairs]
            xs = [i + 0.08 * (offset - 1.5) for i in range(len(pairs))]
            means = [s.get("mean") if s.get("mean") is not None else math.nan for s in stats]
            stds = [s.get("std") if s.get("std") is not None else 0.0 for s in stats]
            consistency_axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=header.rstrip(" ↑"))
        consistency_axes.set(xticks=range(len(pairs)), xticklabels=pairs, ylim=(-1.05, 1.05))
        consistency_axes.axhline(0, color="grey", linewidth=0.5)
        consistency_axes.legend(fontsize="small")
    else:
        consistency_axes.text(0.5, 0.5, "no consecutive pairs", ha="center", va="center")
        consistency_axes.set_axis_off()
    consistency_axes.set_title("Ranking consistency (Table 2, mean ± std)")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_report(results: Any, output_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (every number and per-row prediction), ``results.md`` and ``results.png``.

    The figure needs matplotlib (an optional dependency); without it the PNG is skipped with a warning.

    Returns:
        `dict[str, Path]`: ``{"json": ..., "markdown": ..., "png": ...}`` (no ``"png"`` without matplotlib).
    """
    data = _as_dict(results)
    return write_results(data, output_dir, render_markdown(data), plot_results)


def write_results(
    data: Mapping[str, Any], output_dir: str | Path, markdown: str, plot: Callable[[Any, Path], Path]
) -> dict[str, Path]:
    """``results.json`` (strict JSON: NaN becomes null), ``results.md`` and, with matplotlib, ``results.png``
    drawn by ``plot``; shared by the evaluation and the study reports."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    text = json.dumps(_json_safe(data), indent=2, ensure_ascii=False, allow_nan=False)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown, encoding="utf-8")
    try:
        paths["png"] = plot(data, output_dir / "results.png")
    except ImportError as error:
        warnings.warn(f"Skipping results.png: {error}", stacklevel=2)
    return paths
