"""The trainer's door to the Hub: what `CreamTrainer` calls, and when.

[`start`] builds the background [`HubPublisher`] and checks, before any training, that the Hub answers;
[`publish_iteration`] writes ``M<k>``'s model card and schedules its push; [`base_model_path`] names π_0 for the card
and the merged weights. How a push is made (retries, commits, markers) is `trl_cream.hub.publisher`'s; what goes on a
card is `trl_cream.hub.model_card`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..inspection.card import round_section
from ..runs.layout import RunLayout, round_of_iteration
from .model_card import CardSettings, build_model_card, load_round_metrics, run_urls, write_card
from .publisher import HubPublisher, HubPushError, HubSettings
from .utils import HubArgs

__all__ = ["base_model_path", "publish_iteration", "start"]


def start(
    args: HubArgs, *, use_peft: bool, base_model: str | None, is_main: bool, num_processes: int
) -> HubPublisher | None:
    """Called from `CreamTrainer.__init__`: with `push_to_hub`, build the publisher on the main process and check,
    before any training, that the Hub answers and the token is accepted. With several processes, the main process's
    verdict is broadcast, so that every rank raises the same error instead of waiting for the main one.

    Args:
        args: the `CreamConfig` ([`HubArgs`]).
        use_peft: whether the policy is a LoRA adapter.
        base_model: the base model's path or Hub id ([`base_model_path`]).
        is_main: whether this is the main process (the one that pushes).
        num_processes: the world size.
    """
    if not args.push_to_hub:
        return None
    if args.push_merged_weights and use_peft and not base_model:
        raise ValueError(
            "push_merged_weights=True needs the base model's path or Hub id to merge the adapter into, but the "
            "adapter's base_model_name_or_path is empty. Load the base model with from_pretrained(path) or set "
            "push_merged_weights=False."
        )
    publisher, error = None, None
    if is_main:
        publisher = HubPublisher(HubSettings.from_args(args))
        try:
            publisher.check_access()
        except HubPushError as failure:
            error = str(failure)
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise HubPushError(error)
    return publisher


def publish_iteration(
    publisher: HubPublisher | None,
    card: CardSettings,
    index: int,
    *,
    first_index: int,
    trainer_cls: type,
    round_metrics: list[dict[str, Any]],
    sft_metrics: dict[str, Any],
    use_peft: bool,
    base_model: str | None,
) -> None:
    """Write ``M<index>/README.md`` and, with a publisher (`push_to_hub`), schedule its push. Main process only.

    Args:
        publisher: from [`start`]; `None` writes the card only.
        card: the card's settings (`CardSettings.from_args` of the `CreamConfig`: output_dir, hub settings, the
            fields shown on the card).
        index: the iteration ``k`` of ``M<k>``.
        first_index: ``k`` of the starting policy.
        trainer_cls: the trainer class (TRL's card reads its `_tag_names`, `_name`, `_paper`).
        round_metrics: the finished rounds' metrics kept in memory (older ones are read from disk).
        sft_metrics: the SFT stage's metrics (empty without one).
        use_peft: whether ``M<k>`` is a LoRA adapter.
        base_model: the base model's path or Hub id ([`base_model_path`]).
    """
    layout = RunLayout(card.output_dir)
    folder = layout.iteration_dir(index)
    evaluation = json.loads(Path(card.results).read_text()) if card.results else None
    wandb_url, trackio_url = run_urls()  # the run's links, as on TRL's own cards
    model_card = build_model_card(
        trainer_cls=trainer_cls,
        index=index,
        first_index=first_index,
        settings=card,
        rounds=load_round_metrics(card.output_dir, round_metrics, round_of_iteration(index, first_index)),
        peft=use_peft,
        base_model=card.base_model_id or base_model,
        sft_metrics=sft_metrics,
        evaluation=evaluation,
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        round_section=round_section(card.output_dir, round_of_iteration(index, first_index), folder),
    )
    write_card(model_card, folder)
    if publisher is not None:
        t = round_of_iteration(index, first_index)
        publisher.submit(index, folder, layout.round_dir(t) if t > 0 else None)


def base_model_path(model: Any, ref_model: Any | None, use_peft: bool) -> str | None:
    """The base model's path or Hub id: the adapter's ``base_model_name_or_path`` (LoRA), else the name π_0 (or the
    policy) was loaded from."""
    if use_peft:
        for config in model.peft_config.values():
            if config.base_model_name_or_path:
                return config.base_model_name_or_path
        return None
    reference = ref_model if ref_model is not None else model
    return getattr(reference.config, "_name_or_path", None) or None
