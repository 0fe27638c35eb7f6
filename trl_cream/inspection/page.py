"""`trl-cream inspect OUTPUT_DIR`: one self-contained HTML page of a run (or of a study's runs, side by side).

The page is a Jinja2 template (``templates/inspect.html.j2``) with the plots inlined as SVG and a little inline
JavaScript to sort and filter the prompt table: no server, no network, so it opens from disk and from a Hub repo's
file view. Reading the run writes nothing in it and takes no lock, so a running run can be inspected.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from . import plots
from .run_view import RunView, find_runs, read_run

PAGE_NAME = "inspect.html"
_PHASES = ("generate", "score", "pair", "train", "save")


def write_page(output_dir: str | Path, page: str | Path | None = None, title: str | None = None) -> Path:
    """Read the run(s) in ``output_dir`` and write the page (default ``output_dir/inspect.html``); returns its path.

    Raises:
        FileNotFoundError: ``output_dir`` holds no CREAM run (no ``cream_state/manifest.json`` or ``rounds/``, at
            its top or up to three folders down).
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"trl-cream inspect: {root} is not a folder. Give the output_dir of a run or a study.")
    found = find_runs(root)
    if not found:
        raise FileNotFoundError(
            f"trl-cream inspect: {root} holds no CREAM run (no cream_state/manifest.json or rounds/ in it or in its "
            "subfolders). Give the output_dir of a `trl-cream train`/`demo` run or of a `trl-cream study`."
        )
    runs = [read_run(path, name) for name, path in found]
    target = Path(page) if page is not None else root / PAGE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_page(runs, title or f"CREAM run: {root.resolve().name}", source=str(root)), "utf-8")
    return target


def render_page(runs: list[RunView], title: str, source: str = "") -> str:
    """The page's HTML for ``runs``."""
    started = time.perf_counter()
    env = Environment(
        loader=PackageLoader("trl_cream.inspection", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["sv"] = sort_key
    has_rows = any(r.rows for run in runs for r in run.rounds)
    figures = {
        "C and τ per round": plots.consistency_plot(runs),
        "Chosen vs rejected length per round": plots.length_plot(runs),
    }
    if has_rows:
        figures["Reward margin r(chosen) − r(rejected) per round"] = plots.margin_plot(runs)
        figures["Per-prompt C"] = plots.prompt_consistency_plot(runs)
    context = {
        "title": title,
        "source": source,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": [_run_context(run) for run in runs],
        "multi": len(runs) > 1,
        "side_by_side": _side_by_side(runs) if len(runs) > 1 else None,
        "figures": figures,
        "prompts": _most_inconsistent_first(
            [_prompt_context(run, r, row) for run in runs for r in run.rounds for row in r.rows]
        ),
        "rounds": sorted({r.t for run in runs for r in run.rounds}),
        "notes": [f"{run.name}, round {r.t}: {r.note}" for run in runs for r in run.rounds if r.note],
    }
    page = env.get_template("inspect.html.j2").render(**context)
    return page.replace("__RENDER_SECONDS__", f"{time.perf_counter() - started:.2f}")


def _run_context(run: RunView) -> dict[str, Any]:
    lineage = [{"name": "M0", "what": "π_0, the initial model", "pushed": None}]
    if run.first >= 1:
        sft = run.sft_metrics
        what = "after SFT" + (f" ({sft['sft_steps']} steps)" if sft.get("sft_steps") is not None else "")
        lineage.append({"name": f"M{run.first}", "what": what, "saved": run.first in run.iterations,
                        "pushed": _pushed(run, run.first)})  # fmt: skip
    rounds = []
    for r in run.rounds:
        k = run.iteration_of(r.t)
        times = {p: r.get(f"time_{p}_s") for p in _PHASES if r.get(f"time_{p}_s") is not None}
        rounds.append({
            "t": r.t, "start": f"M{k}", "end": f"M{k + 1}", "status": r.status, "saved": k + 1 in run.iterations,
            "pushed": _pushed(run, k + 1), "c": r.get("consistency"), "tau": r.get("kendall_tau_mean"),
            "tau_std": r.get("kendall_tau_std"), "pairs": r.get("num_pairs"), "tied": r.get("num_tied_skipped"),
            "prompts": r.get("num_prompts"), "loss": r.get("train_loss"), "steps": r.get("train_steps"),
            "moved": r.get("weight_change"), "times": times, "no_op": r.get("no_op"),
            "chosen_len": r.get("chosen_length_mean"), "rejected_len": r.get("rejected_length_mean"),
        })  # fmt: skip
    shown = ("num_iterations", "num_generations", "consistency_measure", "consistency_granularity", "beta",
             "learning_rate")  # fmt: skip
    settings = {k: run.config[k] for k in shown if k in run.config}
    return {"name": run.name, "path": str(run.path), "lineage": lineage, "rounds": rounds, "settings": settings}


def _pushed(run: RunView, k: int) -> str | None:
    marker = run.pushed.get(k)
    if not marker:
        return None
    return f"{marker.get('repo_id', '?')}@{marker.get('revision', '?')}"


def _side_by_side(runs: list[RunView]) -> dict[str, Any]:
    """Per round, each run's C, τ, pairs and chosen/rejected length: the methods side by side."""
    rounds = sorted({r.t for run in runs for r in run.rounds})
    table = []
    for t in rounds:
        cells = []
        for run in runs:
            r = next((x for x in run.rounds if x.t == t), None)
            cells.append(None if r is None else {
                "c": r.get("consistency"), "tau": r.get("kendall_tau_mean"), "pairs": r.get("num_pairs"),
                "chosen_len": r.get("chosen_length_mean"), "rejected_len": r.get("rejected_length_mean"),
            })  # fmt: skip
        table.append({"t": t, "cells": cells})
    return {"names": [run.name for run in runs], "rows": table}


def _prompt_context(run: RunView, r: Any, row: Any) -> dict[str, Any]:
    candidates = []
    for c in row.by_rank():
        role = "chosen" if c.index == row.chosen else "rejected" if c.index == row.rejected else ""
        candidates.append({"index": c.index, "completion": c.completion, "tokens": c.num_tokens, "reward": c.reward,
                           "baseline": c.baseline_reward, "rank": c.rank, "baseline_rank": c.baseline_rank,
                           "role": role, "disagrees": c.disagrees})  # fmt: skip
    chosen = row.candidates[row.chosen].num_tokens if row.chosen is not None else None
    rejected = row.candidates[row.rejected].num_tokens if row.rejected is not None else None
    return {
        "run": run.name,
        "round": r.t,
        "index": row.prompt_index,
        "prompt": row.prompt,
        "tau": row.tau,
        "c": row.consistency,
        "loss_c": row.loss_consistency,
        "margin": row.margin,
        "chosen_len": chosen,
        "rejected_len": rejected,
        "disagreements": row.num_disagreements,
        "candidates": candidates,
        "baseline_name": "π_0 baseline" if r.t == 1 else f"π_{{t−1}} = M{run.iteration_of(r.t) - 1}",
        "policy_name": f"π_t = M{run.iteration_of(r.t)}",
    }


def _most_inconsistent_first(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lowest τ first, undefined τ (a fully tied ranking) last; the page's script keeps that order on load."""
    return sorted(prompts, key=lambda p: (math.isnan(p["tau"]), p["tau"] if not math.isnan(p["tau"]) else 0.0))


def _num(value: Any, digits: int = 3) -> str:
    """A number for a cell: ``—`` for missing or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def sort_key(value: Any) -> str:
    """The ``data-v`` of a sortable cell: nan/None sort last."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)
