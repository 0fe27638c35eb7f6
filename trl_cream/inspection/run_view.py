"""A run on disk as the page shows it, read without writing anything and without the run's lock, so that a run can
be inspected while it trains: its lineage ``M0 → M1 → …``, each round's metrics and prompts, what was pushed.

A round is shown as far as it got: ``sampled``, ``scored``, ``labelled`` (its pairs are saved; training), ``done``
(``metrics.json``). A `trl-cream study` folder holds one run per method and seed (``<method>/seed<s>/``): `find_runs`
finds every run below a folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import load_from_disk

from ..modeling.movement import weight_change
from ..runs.layout import RunLayout, iteration_index
from .rounds import PromptRow, prompt_rows

_ROUND_NAME = re.compile(r"round_(\d+)")
# Weight changes are measured from the saved M<k> only when both are this small (LoRA adapters, small models), so
# that the page stays fast on a large full fine-tuning run.
MAX_WEIGHT_BYTES = 256 * 2**20


@dataclass
class RoundView:
    """Round ``t`` as saved so far."""

    t: int
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[PromptRow] = field(default_factory=list)
    note: str | None = None  # why the prompts are not shown, if they are not

    def get(self, key: str) -> Any:
        return self.metrics.get(key)


@dataclass
class RunView:
    """One CREAM run: its rounds, iterations, pushes and settings."""

    name: str
    path: Path
    first: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    sft_metrics: dict[str, Any] = field(default_factory=dict)
    iterations: list[int] = field(default_factory=list)
    rounds: list[RoundView] = field(default_factory=list)
    pushed: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_iterations(self) -> int | None:
        return self.config.get("num_iterations")

    def iteration_of(self, t: int) -> int:
        """``k`` of ``π_t = M<k>``, the policy round ``t`` starts from."""
        return iteration_index(t, self.first)


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a CREAM run (a manifest, or rounds)."""
    layout = RunLayout(path)
    return layout.manifest_path.is_file() or layout.rounds_dir.is_dir()


def find_runs(output_dir: str | Path, max_depth: int = 3) -> list[tuple[str, Path]]:
    """``(name, folder)`` of the run in ``output_dir``, or of every run below it (a study: ``cream/seed0`` ...)."""
    root = Path(output_dir)
    if is_run(root):
        return [(root.name or str(root), root)]
    found: list[tuple[str, Path]] = []

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if is_run(child):
                found.append((child.relative_to(root).as_posix(), child))
            elif depth < max_depth:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 1)
    return found


def read_run(path: str | Path, name: str | None = None, with_prompts: bool = True) -> RunView:
    """Everything the page shows of the run in ``path``."""
    layout = RunLayout(path)
    manifest = _read_json(layout.manifest_path) or {}
    run = RunView(name=name or layout.output_dir.name, path=layout.output_dir)
    run.first = int((manifest.get("policy") or {}).get("first_iteration", 1))
    run.config = {**(manifest.get("config") or {}), **(manifest.get("settings") or {})}
    run.sft_metrics = _read_json(layout.sft_metrics_path) or {}
    run.iterations = layout.iterations()
    for k in run.iterations:
        marker = _read_json(layout.push_marker_path(k))
        if marker is not None:
            run.pushed[k] = marker
    rounds = sorted(int(m.group(1)) for p in _dirs(layout.rounds_dir) if (m := _ROUND_NAME.fullmatch(p.name)))
    moved = _weight_changes(run, layout)
    for t in rounds:
        view = read_round(layout, t, with_prompts)
        if t in moved and view.metrics.get("weight_change") is None:
            view.metrics["weight_change"] = moved[t]
        run.rounds.append(view)
    return run


def read_round(layout: RunLayout, t: int, with_prompts: bool = True) -> RoundView:
    """Round ``t``'s metrics (``metrics.json``, else the pairing phase's ``pairing.json``) and its prompts."""
    folder = layout.round_dir(t)
    metrics = _read_json(layout.round_metrics_path(t))
    status = "done"
    if metrics is None:
        metrics = _read_json(layout.pairing_path(t))
        status = "labelled (training)" if metrics is not None else _early_status(folder)
    view = RoundView(t=t, status=status, metrics=metrics or {"round": t})
    candidates, pairs = folder / "candidates", folder / "pairs"
    if not with_prompts:
        return view
    if not candidates.is_dir():
        view.note = (
            "no candidates table saved (save_round_artifacts=False, or the round is not labelled yet)"
            if status in ("done", "labelled (training)")
            else "not labelled yet"
        )
        return view
    try:
        pairs_table = load_from_disk(str(pairs)) if pairs.is_dir() else None
        view.rows = prompt_rows(t, load_from_disk(str(candidates)), pairs_table)
    except Exception as error:  # a half-written folder of a running run: show the rest of the page
        view.note = f"could not read {candidates}: {error}"
    return view


def _early_status(folder: Path) -> str:
    if (folder / "scores.safetensors").exists():
        return "scored"
    if (folder / "samples").exists():
        return "sampled"
    return "started"


def _weight_changes(run: RunView, layout: RunLayout) -> dict[int, float]:
    """``‖θ_(t+1) − θ_t‖ / ‖θ_t‖`` per round: from a demo's ``report/rounds.json``, else measured on the saved
    ``M<k>`` when they are small (`MAX_WEIGHT_BYTES`)."""
    saved = _read_json(layout.output_dir / "report" / "rounds.json")
    if isinstance(saved, list):
        return {int(r["round"]): r["weight_change"] for r in saved if r.get("weight_change") is not None}
    moved = {}
    for k in run.iterations:
        t = k - run.first
        if t >= 1 and k - 1 in run.iterations:
            old, new = layout.iteration_dir(k - 1), layout.iteration_dir(k)
            if _size(old) + _size(new) <= MAX_WEIGHT_BYTES:
                change = weight_change(old, new)
                if change is not None:
                    moved[t] = change
    return moved


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
