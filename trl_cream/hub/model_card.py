"""The model card of a CREAM iteration ``M<k>``, built on TRL's card machinery (`generate_model_card`, the trainer's
`_tag_names`, `_name` and `_paper`), plus CREAM's own sections: lineage, key config, every round so far, the
evaluation tables when an evaluation ran, and how to load this iteration. Contains no token."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from transformers.integrations import is_wandb_available
from trl.trainer.utils import generate_model_card, get_trackio_space_url

from ..runs.layout import RunLayout, round_of_iteration
from .utils import MERGED_SUBFOLDER, HubArgs, iteration_target

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


@dataclass(frozen=True)
class CardSettings:
    """What the model card reads of the config; built by [`CardSettings.from_args`] when a card is written (so that a
    field changed since the trainer was built, such as ``gradient_accumulation_steps`` on a resume with another
    process count, shows as it is now).

    Attributes:
        output_dir (`str`): the run's folder (a local run's card loads ``M<k>`` from it).
        hub_model_id (`str` or `None`): the Hub repo; `None` for a local run.
        strategy (`str`): ``hub_iteration_strategy``.
        push_merged_weights (`bool`): whether the merged LoRA weights go up too.
        base_model_id (`str` or `None`): ``hub_base_model_id``, π_0's Hub id when set.
        results (`str` or `None`): ``hub_card_results``, the ``results.json`` of `trl-cream eval` to show.
        config (`tuple`): ``(name, value)`` of each field of `CARD_CONFIG_FIELDS` the config has, in that order.
    """

    output_dir: str
    hub_model_id: str | None = None
    strategy: str = "branch"
    push_merged_weights: bool = False
    base_model_id: str | None = None
    results: str | None = None
    config: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_args(cls, args: HubArgs) -> CardSettings:
        """The card's fields of a `CreamConfig` ([`HubArgs`], plus those of `CARD_CONFIG_FIELDS` it has)."""
        return cls(
            output_dir=str(args.output_dir),
            hub_model_id=args.hub_model_id,
            strategy=args.hub_iteration_strategy,
            push_merged_weights=args.push_merged_weights,
            base_model_id=args.hub_base_model_id,
            results=args.hub_card_results,
            config=tuple((name, getattr(args, name)) for name in CARD_CONFIG_FIELDS if hasattr(args, name)),
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
                phases, reused = ("generate", "score", "pair", "train", "save"), set(m.get("reused_phases", []))
                cells.append(
                    " / ".join("reused" if p in reused else _fmt(m.get(f"time_{p}_s"), "{:.1f}") for p in phases)
                )
            else:
                cells.append(_fmt(m.get(key), spec))
        lines.append(f"| {m.get('round', '?')} | " + " | ".join(cells) + " |")
    notes = [f"- Round {m.get('round', '?')} learnt nothing: {m['no_op']}." for m in rounds if m.get("no_op")]
    if any(m.get("reused_phases") for m in rounds):
        notes.append("- *reused*: a resumed run loaded that phase's saved result instead of running it again.")
    return "\n".join(lines + ([""] + notes if notes else []))


def run_urls() -> tuple[str | None, str | None]:
    """The W&B run and the Trackio Space of this process's run, as TRL's `create_model_card` finds them."""
    wandb_url = None
    if is_wandb_available():
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    return wandb_url, get_trackio_space_url()


def card_model_name(hub_model_id: str | None, base_model: str | None, index: int) -> str:
    """``<repo name>-M<k>`` for a Hub run; ``<base model name>-CREAM-M<k>`` for a local one (never the output
    folder's name, which says nothing about the model)."""
    if hub_model_id:
        return f"{hub_model_id.rstrip('/').split('/')[-1]}-M{index}"
    stem = Path(base_model).name if base_model else ""
    return f"{stem}-CREAM-M{index}" if stem else f"CREAM-M{index}"


def describe_base(base_model: str | None) -> str:
    """π_0 for the card: a Hub id as is; a local folder by its name only (its path means nothing on the Hub)."""
    if not base_model:
        return "unknown"
    if _is_local(base_model):
        return f"a local model (folder `{Path(base_model).name}`; set `hub_base_model_id` to name its Hub id)"
    return f"`{base_model}`"


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
    settings: CardSettings,
    rounds: list[dict[str, Any]],
    peft: bool,
    base_model: str | None,
    sft_metrics: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    wandb_url: str | None = None,
    trackio_url: str | None = None,
    round_section: str | None = None,
) -> ModelCard:
    """The card of ``M<index>``: TRL's language-model card (tags, trainer name, paper, citation, W&B / Trackio links)
    with CREAM's lineage, evaluation and loading sections before "Training procedure", and the configuration and
    every round inside it."""
    hub_model_id = settings.hub_model_id or Path(settings.output_dir).name
    strategy = settings.strategy
    repo_id, revision = iteration_target(hub_model_id, strategy, index)
    if not settings.hub_model_id:  # a local run: load from the folder
        repo_id, revision = RunLayout(settings.output_dir).iteration_dir(index).as_posix(), "main"
    paper = getattr(trainer_cls, "_paper", {}) or {}
    name = getattr(trainer_cls, "_name", "CREAM")
    base_hub_id = base_model if base_model and not _is_local(base_model) else None
    card = generate_model_card(
        base_model=base_hub_id,
        model_name=card_model_name(settings.hub_model_id, base_model, index),
        hub_model_id=repo_id,
        dataset_name=None,
        tags=[*getattr(trainer_cls, "_tag_names", []), f"cream-iteration-{index}"],
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        trainer_name=name,
        trainer_citation=paper.get("citation"),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
    )
    card.data.licence = None  # TRL's template writes `licence: license`; the licence is the base model's
    if trackio_url:
        card.data.tags = [*card.data.tags, f"trackio:{trackio_url}"]
    text = card.text.replace("[None](https://huggingface.co/None)", "a local base model")
    before = [_lineage(index, first_index, settings.hub_model_id, strategy, base_model, sft_metrics)]
    if evaluation:
        before.append(_evaluation_section(evaluation))
    if round_section:  # the round's plot and its most inconsistent prompts (`trl_cream.inspection.card`)
        before.append(round_section)
    before.append(load_instructions(repo_id, revision, peft, base_model, peft and settings.push_merged_weights))
    inside = [
        "### CREAM configuration\n\n" + _config_table(settings.config),
        _rounds_section(round_of_iteration(index, first_index), rounds),
    ]
    text = _insert(text, "## Training procedure", "\n".join(before) + "\n", before_marker=True)
    text = _insert(_drop_blank_lines_after(text, "## Training procedure"), "### Framework versions",
                   "\n".join(inside) + "\n", before_marker=True)  # fmt: skip
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")


def _is_local(model: str) -> bool:
    """A folder on this machine (or a path that looks like one), not a Hub id."""
    return Path(model).exists() or Path(model).is_absolute() or model.startswith((".", "~"))


def _insert(text: str, marker: str, block: str, before_marker: bool) -> str:
    if marker not in text:
        return text + "\n" + block
    return text.replace(marker, block + marker if before_marker else marker + block, 1)


def _drop_blank_lines_after(text: str, heading: str) -> str:
    """TRL's template leaves empty badge lines under a heading when no W&B / Trackio / Comet run is linked."""
    head, sep, tail = text.partition(heading + "\n")
    if not sep:
        return text
    return head + sep + "\n" + re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", tail.lstrip(" \t\n"))


def _lineage(
    index: int,
    first_index: int,
    hub_model_id: str | None,
    strategy: str,
    base_model: str | None,
    sft_metrics: dict[str, Any] | None,
) -> str:
    lines = ["## Lineage", ""]
    lines.append(f"- Base model (π_0 = M0): {describe_base(base_model)}")
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


def _config_table(config: tuple[tuple[str, Any], ...]) -> str:
    rows = ["| field | value |", "|---|---|"]
    rows += [f"| `{name}` | `{value}` |" for name, value in config]
    return "\n".join(rows) + "\n"


def _rounds_section(num_rounds: int, rounds: list[dict[str, Any]]) -> str:
    if num_rounds <= 0 or not rounds:
        return "### CREAM rounds\n\nNo CREAM round yet: this is the starting policy.\n"
    return (
        f"### CREAM rounds\n\nEvery round up to this iteration (C: consistency rate; τ: Kendall τ-b between the "
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
