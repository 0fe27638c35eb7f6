"""The page's plots as inline SVG (matplotlib, no pyplot state): C and τ per round, the reward margin of the pairs,
chosen vs rejected length, and the per-prompt C. Every plot takes one or several runs (a study: one colour each)."""

from __future__ import annotations

import io
import math
import re
from typing import Any

from .run_view import RunView

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _figure(width: float = 5.2, height: float = 3.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "trl-cream inspect draws its plots with matplotlib, which is not installed. Install it with "
            "`pip install matplotlib` (or `pip install trl-cream[demo]`)."
        ) from error
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def to_svg(fig: Any, name: str) -> str:
    """The figure as an inline ``<svg>`` element (text kept as text; ids prefixed so several plots share a page)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return re.sub(r"<svg ", f'<svg role="img" aria-label="{name}" class="plot" ', svg, count=1)


def _colour(i: int) -> str:
    return _COLOURS[i % len(_COLOURS)]


def _label(runs: list[RunView], run: RunView) -> str | None:
    return run.name if len(runs) > 1 else None


def consistency_plot(runs: list[RunView]) -> str:
    """C (what the loss used) and the mean per-prompt τ of each round."""
    fig, ax = _figure()
    for i, run in enumerate(runs):
        rounds = [r.t for r in run.rounds if r.get("consistency") is not None]
        c = [r.get("consistency") for r in run.rounds if r.get("consistency") is not None]
        tau = [_nan(r.get("kendall_tau_mean")) for r in run.rounds if r.get("consistency") is not None]
        name = _label(runs, run)
        ax.plot(rounds, c, "o-", color=_colour(i), label=f"C {name}" if name else "C")
        ax.plot(rounds, tau, "s--", color=_colour(i), alpha=0.7, label=f"τ {name}" if name else "mean τ")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set(xlabel="round", ylabel="C (0..1), τ (−1..1)", title="Consistency per round", ylim=(-1.05, 1.05))
    _round_ticks(ax, runs)
    ax.legend(fontsize="small")
    return to_svg(fig, "consistency-per-round")


def margin_plot(runs: list[RunView]) -> str:
    """The distribution of r(chosen) − r(rejected) over each round's pairs."""
    fig, ax = _figure()
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        data, positions = [], []
        for r in run.rounds:
            margins = [m for row in r.rows if (m := row.margin) is not None]
            if margins:
                data.append(margins)
                positions.append(r.t + (i - (len(runs) - 1) / 2) * width)
        if data:
            parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False)
            for box in parts["boxes"]:
                box.set(facecolor=_colour(i), alpha=0.5)
            ax.plot([], [], color=_colour(i), label=_label(runs, run))
    ax.set(xlabel="round", ylabel="r(chosen) − r(rejected)", title="Reward margin of the pairs")
    _round_ticks(ax, runs)
    if len(runs) > 1:
        ax.legend(fontsize="small")
    return to_svg(fig, "reward-margin")


def length_plot(runs: list[RunView]) -> str:
    """Mean length (tokens) of the chosen and of the rejected candidates per round: the length drift."""
    fig, ax = _figure()
    for i, run in enumerate(runs):
        rounds, chosen, rejected = [], [], []
        for r in run.rounds:
            c, j = _pair_lengths(r)
            if c is not None:
                rounds.append(r.t)
                chosen.append(c)
                rejected.append(j)
        name = _label(runs, run)
        ax.plot(rounds, chosen, "o-", color=_colour(i), label=f"chosen {name}" if name else "chosen")
        ax.plot(rounds, rejected, "x:", color=_colour(i), label=f"rejected {name}" if name else "rejected")
    ax.set(xlabel="round", ylabel="mean tokens", title="Chosen vs rejected length")
    _round_ticks(ax, runs)
    ax.legend(fontsize="small")
    return to_svg(fig, "length-drift")


def prompt_consistency_plot(runs: list[RunView]) -> str:
    """Histogram of the prompts' own C per round (0: the two models rank its candidates in reverse)."""
    fig, ax = _figure()
    bins = [k / 10 for k in range(11)]
    styles = ("-", "--", ":", "-.")
    for i, run in enumerate(runs):
        for k, r in enumerate(run.rounds):
            values = [row.consistency for row in r.rows if not math.isnan(row.consistency)]
            if values:
                name = f"{run.name} round {r.t}" if len(runs) > 1 else f"round {r.t}"
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5, linestyle=styles[k % len(styles)],
                        color=_colour(i if len(runs) > 1 else k), label=name)  # fmt: skip
    ax.set(xlabel="the prompt's C", ylabel="prompts", title="Per-prompt C", xlim=(0, 1))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return to_svg(fig, "per-prompt-c")


def round_plot(run: RunView, t: int) -> str:
    """One round's per-prompt C histogram and margins, for the model card of the iteration it produced."""
    one = RunView(name=run.name, path=run.path, rounds=[r for r in run.rounds if r.t == t])
    return prompt_consistency_plot([one])


def _pair_lengths(r: Any) -> tuple[float | None, float | None]:
    pairs = [row for row in r.rows if row.chosen is not None]
    if pairs:
        chosen = sum(row.candidates[row.chosen].num_tokens for row in pairs) / len(pairs)
        rejected = sum(row.candidates[row.rejected].num_tokens for row in pairs) / len(pairs)
        return chosen, rejected
    c, j = r.get("chosen_length_mean"), r.get("rejected_length_mean")
    return (None, None) if c is None or j is None or math.isnan(c) else (c, j)


def _round_ticks(ax: Any, runs: list[RunView]) -> None:
    rounds = sorted({r.t for run in runs for r in run.rounds})
    if rounds:
        ax.set_xticks(rounds)


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)
