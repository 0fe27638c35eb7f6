"""The model card of a CREAM iteration ``M<k>``, built on TRL's card machinery (`generate_model_card`, the trainer's
`_tag_names`, `_name` and `_paper`), plus CREAM's own sections: lineage, key config, every round so far, the
evaluation tables when an evaluation ran, and how to load this iteration. Contains no token."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from trl.trainer.utils import generate_model_card

from ..runs.layout import RunLayout, round_of_iteration
from .utils import MERGED_SUBFOLDER, iteration_target

# Config fields shown on the card (never `hub_token` or any other secret).
CARD_CONFIG_FIELDS: tuple[str, ...] = (
    "num_iterations",
    "num_generations",
    "consistency_measure",
    "consistency_granularity",
    "ref_policy",
    "beta",
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "temperature",
    "top_p",
    "max_new_tokens",
    "max_length",
    "seed",
)

# (metrics key, column header, format) of the rounds table.
ROUND_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("consistency", "C", "{:.3f}"),
    ("kendall_tau", "τ mean ± std", ""),
    ("num_tied_skipped", "tied prompts", "{:d}"),
    ("num_pairs", "pairs", "{:d}"),
    ("reward_margin_mean", "reward margin", "{:.3f}"),
    ("beta", "β", "{:g}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("times", "time gen / score / pair / train / save (s)", ""),
)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if spec == "{:d}":
        return str(int(value))
    return spec.format(value) if spec else str(value)


def rounds_table(rounds: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per round, from the round metrics (`CreamTrainer.round_metrics` / metrics.json)."""
    header = "| round | " + " | ".join(h for _, h, _ in ROUND_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(ROUND_COLUMNS) + 1)]
    for m in rounds:
        cells = []
        for key, _, spec in ROUND_COLUMNS:
            if key == "kendall_tau":
                mean, std = m.get("kendall_tau_mean"), m.get("kendall_tau_std")
                cells.append("–" if mean is None else f"{_fmt(mean, '{:.3f}')} ± {_fmt(std, '{:.3f}')}")
            elif key == "times":
                phases = ("generate", "score", "pair", "train", "save")
                cells.append(" / ".join(_fmt(m.get(f"time_{p}_s"), "{:.1f}") for p in phases))
            else:
                cells.append(_fmt(m.get(key), spec))
        lines.append(f"| {m.get('round', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_round_metrics(output_dir: str | Path, rounds: list[dict[str, Any]], up_to: int) -> list[dict[str, Any]]:
    """Rounds ``1..up_to``: from ``rounds`` (in memory), else from ``rounds/round_<t>/metrics.json`` (resumed)."""
    by_round = {int(m["round"]): m for m in rounds if "round" in m}
    out = []
    for t in range(1, up_to + 1):
        if t not in by_round:
            path = RunLayout(output_dir).round_metrics_path(t)
            if path.is_file():
                by_round[t] = json.loads(path.read_text())
        if t in by_round:
            out.append(by_round[t])
    return out


def load_instructions(repo_id: str, revision: str, peft: bool, base_model: str | None, merged: bool) -> str:
    """The ``## How to load this iteration`` section."""
    rev = "" if revision == "main" else f', revision="{revision}"'
    if peft:
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}"{rev})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})\n'
        )
        if merged:
            code += (
                "\n# or the merged weights, without peft:\nfrom transformers import AutoModelForCausalLM\n"
                f'merged = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, subfolder="{MERGED_SUBFOLDER}")\n'
            )
        note = f"This iteration is a LoRA adapter on `{base_model or 'its base model'}` (`base_model_name_or_path`)."
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})\n'
        )
        note = "This iteration holds the full weights."
    return f"## How to load this iteration\n\n{note}\n\n```python\n{code}```\n"


def build_model_card(
    *,
    trainer_cls: type,
    index: int,
    first_index: int,
    args: Any,
    rounds: list[dict[str, Any]],
    peft: bool,
    base_model: str | None,
    sft_metrics: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> ModelCard:
    """The card of ``M<index>``: TRL's language-model card (tags, trainer name, paper, citation) with CREAM's sections
    inserted before "Training procedure"."""
    hub_model_id = args.hub_model_id or Path(args.output_dir).name
    strategy = getattr(args, "hub_iteration_strategy", "branch")
    repo_id, revision = iteration_target(hub_model_id, strategy, index)
    if not args.hub_model_id:  # a local run: load from the folder
        repo_id, revision = RunLayout(args.output_dir).iteration_dir(index).as_posix(), "main"
    paper = getattr(trainer_cls, "_paper", {}) or {}
    name = getattr(trainer_cls, "_name", "CREAM")
    base_hub_id = base_model if base_model and not Path(base_model).exists() else None
    card = generate_model_card(
        base_model=base_hub_id,
        model_name=f"{hub_model_id} (M{index})",
        hub_model_id=repo_id,
        dataset_name=None,
        tags=[*getattr(trainer_cls, "_tag_names", []), f"cream-iteration-{index}"],
        wandb_url=None,
        trackio_url=None,
        trainer_name=name,
        trainer_citation=paper.get("citation"),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
    )
    text = card.text.replace("[None](https://huggingface.co/None)", "a local base model")
    sections = [
        _lineage(index, first_index, args.hub_model_id, strategy, base_model, sft_metrics),
        "## CREAM configuration\n\n" + _config_table(args),
        _rounds_section(round_of_iteration(index, first_index), rounds),
    ]
    if evaluation:
        sections.append(_evaluation_section(evaluation))
    sections.append(
        load_instructions(repo_id, revision, peft, base_model, peft and getattr(args, "push_merged_weights", False))
    )
    marker = "## Training procedure"
    cream = "\n".join(sections) + "\n"
    text = text.replace(marker, cream + marker, 1) if marker in text else text + "\n" + cream
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")


def _lineage(
    index: int,
    first_index: int,
    hub_model_id: str | None,
    strategy: str,
    base_model: str | None,
    sft_metrics: dict[str, Any] | None,
) -> str:
    lines = ["## Lineage", ""]
    lines.append(f"- Base model (π_0 = M0): `{base_model or 'unknown'}`")
    if index == first_index:
        how = "the SFT stage on the seed data" if sft_metrics else "the starting policy given to the trainer"
        lines.append(f"- This is M{index}, {how}; the CREAM rounds start from it.")
    else:
        previous = f"trained by CREAM round {round_of_iteration(index, first_index)} from"
        if hub_model_id:
            prev_repo, prev_rev = iteration_target(hub_model_id, strategy, index - 1)
            link = f"https://huggingface.co/{prev_repo}" + (f"/tree/{prev_rev}" if prev_rev != "main" else "")
            where = f"[M{index - 1}]({link}) (`{prev_repo}`, revision `{prev_rev}`)"
            lines.append(f"- This is M{index}, {previous} {where}.")
        else:
            lines.append(f"- This is M{index}, {previous} M{index - 1} (the folder `M{index - 1}` next to this one).")
    if sft_metrics:
        loss = sft_metrics.get("sft_loss")
        lines.append(f"- SFT stage: loss {_fmt(loss, '{:.4f}')} over {sft_metrics.get('sft_steps', '?')} steps.")
    return "\n".join(lines) + "\n"


def _config_table(args: Any) -> str:
    rows = ["| field | value |", "|---|---|"]
    for name in CARD_CONFIG_FIELDS:
        if hasattr(args, name):
            rows.append(f"| `{name}` | `{getattr(args, name)}` |")
    return "\n".join(rows) + "\n"


def _rounds_section(num_rounds: int, rounds: list[dict[str, Any]]) -> str:
    if num_rounds <= 0 or not rounds:
        return "## CREAM rounds\n\nNo CREAM round yet: this is the starting policy.\n"
    return (
        f"## CREAM rounds\n\nEvery round up to this iteration (C: consistency rate; τ: Kendall τ-b between the "
        f"current and the previous ranking; tied prompts are skipped).\n\n{rounds_table(rounds)}\n"
    )


def _evaluation_section(evaluation: dict[str, Any]) -> str:
    from ..evaluation.report import render_markdown

    tables = render_markdown(evaluation).strip().replace("## ", "### ")
    return f"## Evaluation\n\n{tables}\n"


def write_card(card: ModelCard, folder: str | Path) -> Path:
    """Write ``folder/README.md``."""
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path
