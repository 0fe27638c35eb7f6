"""What a pushed iteration's model card shows of the round that produced it: the round's per-prompt C plot (an SVG
beside the card, linked from it) and its most inconsistent prompts, with the pair each one trained on."""

from __future__ import annotations

import math
from pathlib import Path

from ..runs.layout import RunLayout
from .rounds import PromptRow
from .run_view import read_round

PLOT_NAME = "cream_round.svg"
TOP_PROMPTS = 5


def round_section(output_dir: str | Path, t: int, folder: str | Path, top: int = TOP_PROMPTS) -> str | None:
    """The card's "What round t rewarded" section; writes the round's plot as ``folder/cream_round.svg``.

    Returns `None` when the round kept no candidates table (``save_round_artifacts=False``) or for the starting
    policy (``t = 0``).
    """
    if t < 1:
        return None
    layout = RunLayout(output_dir)
    view = read_round(layout, t)
    if not view.rows:
        return None
    lines = [f"## What round {t} rewarded", ""]
    plot = _write_plot(view, Path(folder))
    if plot is not None:
        lines += [f"![Round {t}: the prompts' own C]({plot.name})", ""]
    ranked = sorted(view.rows, key=lambda r: (math.isnan(r.tau), r.tau if not math.isnan(r.tau) else 0.0))
    lines += [
        f"The round's {min(top, len(ranked))} most inconsistent prompts (lowest Kendall τ between the rankings of "
        "their candidates under π_t and under the baseline): the loss weighted their pair by C, so a low C "
        "down-weights it (`trl-cream inspect` shows every prompt).",
        "",
        "| prompt | τ | C (loss) | chosen | rejected |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(row) for row in ranked[:top]]
    return "\n".join(lines) + "\n"


def _row(row: PromptRow) -> str:
    chosen = row.candidates[row.chosen].completion if row.chosen is not None else "—"
    rejected = row.candidates[row.rejected].completion if row.rejected is not None else "—"
    loss_c = "— (tied)" if row.loss_consistency is None else f"{row.loss_consistency:.2f}"
    tau = "—" if math.isnan(row.tau) else f"{row.tau:.2f}"
    return f"| {_cell(row.prompt)} | {tau} | {loss_c} | {_cell(chosen)} | {_cell(rejected)} |"


def _cell(text: str, width: int = 100) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _write_plot(view: object, folder: Path) -> Path | None:
    """The round's per-prompt C histogram, or `None` without matplotlib."""
    from . import plots
    from .run_view import RunView

    try:
        svg = plots.prompt_consistency_plot([RunView(name="", path=folder, rounds=[view])])
    except ImportError:
        return None
    path = folder / PLOT_NAME
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n' + svg.replace(' role="img"', "", 1), "utf-8")
    return path
