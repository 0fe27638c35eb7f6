"""Up-front checks of the trainer's inputs (models, tokenizer, prompt lengths) and of each round's scores.

Every check raises before any expensive work (sampling, scoring, training) and before anything is written, with
what was wrong, the offending value and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..modeling import adapters
from ..modeling.sampling import tokenize_prompts
from .config import CreamConfig
from .data import validate_prompts, validate_sft_dataset

logger = logging.getLogger(__name__)


def check_model_inputs(model: Any, peft_config: Any | None) -> None:
    """A model given as an id, or a PeftModel given together with a new `peft_config`."""
    if isinstance(model, str):
        raise TypeError("Pass an instantiated model (M1), not a model id; load it with from_pretrained first.")
    if peft_config is not None and is_peft_model(model):
        raise ValueError(
            f"`model` is already a PeftModel (adapters {list(model.peft_config)}) and `peft_config` asks for another "
            "adapter on top. Pass either the PeftModel whose active adapter is M1 with peft_config=None, or the base "
            "model with `peft_config`."
        )


def check_tokenizer(tokenizer: PreTrainedTokenizerBase | None, prompts: Sequence[Any]) -> None:
    """A pad (or eos) token, and a chat template when prompts are chat messages."""
    if tokenizer is None:
        return
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has neither a pad nor an eos token, so candidates can be "
            "neither padded nor stopped. Set one first, e.g. tokenizer.pad_token = tokenizer.eos_token = '</s>' (an "
            "existing token, to avoid resizing the embeddings)."
        )
    chat = next((i for i, p in enumerate(prompts) if isinstance(p, list)), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The prompts are chat messages (e.g. row {chat}) but the tokenizer has no chat template. Set "
            "tokenizer.chat_template (e.g. from the instruct model's tokenizer), or pass plain-string prompts."
        )


def prompt_token_budget(max_length: int | None, max_new_tokens: int) -> int | None:
    """Longest prompt whose completion still fits `max_length` when scoring and training."""
    return None if max_length is None else max_length - max_new_tokens


def fit_prompts(
    prompt_ids: list[list[int]], max_length: int | None, max_new_tokens: int, mode: str, where: str = "the prompts"
) -> list[list[int]]:
    """Apply `long_prompts` to prompts longer than ``max_length - max_new_tokens`` tokens.

    ``"truncate"`` keeps each long prompt's last tokens (the scoring pass would cut the same ones) and warns;
    ``"error"`` raises.
    """
    budget = prompt_token_budget(max_length, max_new_tokens)
    if budget is None:
        return prompt_ids
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a prompt after max_new_tokens={max_new_tokens}. Raise "
            "max_length or lower max_new_tokens."
        )
    long = [i for i, ids in enumerate(prompt_ids) if len(ids) > budget]
    if not long:
        return prompt_ids
    longest = max(len(prompt_ids[i]) for i in long)
    if mode == "error":
        raise ValueError(
            f"{len(long)} of {where} (e.g. index {long[0]}, {longest} tokens at most) are longer than "
            f"max_length - max_new_tokens = {max_length} - {max_new_tokens} = {budget} tokens. Raise max_length, "
            "shorten or drop those prompts, or set long_prompts='truncate' to keep their last tokens."
        )
    logger.warning(
        "%d of %s are longer than max_length - max_new_tokens = %d tokens (up to %d): their first tokens are "
        "dropped (long_prompts='truncate').",
        len(long),
        where,
        budget,
        longest,
    )
    return [ids[-budget:] if len(ids) > budget else ids for ids in prompt_ids]


def check_finite_scores(scores: dict[str, torch.Tensor | None], round_index: int, dtype: torch.dtype) -> None:
    """Refuse NaN/inf log-probs (e.g. a bf16/fp16 overflow) before they become rewards, C and pairs."""
    for who, values in scores.items():
        if values is None:
            continue
        bad = ~torch.isfinite(values)
        if bad.any():
            prompt = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"Round {round_index}: {int(bad.sum())} candidate log-probs under {who} are NaN or inf (first at "
                f"prompt {prompt} of the round), with the model in {dtype}. This is usually a half-precision "
                "overflow or a diverged checkpoint: score in float32 (bf16=False, or load the model with "
                "dtype=torch.float32), lower the learning rate, or check that model's weights."
            )


def check_distinct_from_initial(model: nn.Module, ref_model: nn.Module | None, peft_config: Any | None) -> None:
    """Refuse a round 1 where π_t = π_0: every reward would be 0, every candidate tied, and nothing learnt."""
    message = (
        "The policy (M1) is identical to the initial model π_0, so in round 1 every implicit reward "
        "log π_1 − log π_0 is 0, every candidate is tied and no preference pair can be formed. Run an SFT stage "
        "first (Algorithm 1 line 2) or pass a distinct M1."
    )
    if peft_config is not None and not is_peft_model(model):
        raise ValueError(message + " (A fresh `peft_config` adapter starts as the identity.)")
    if is_peft_model(model):
        if adapters.is_identity_adapter(model, adapters.policy_adapter_name(model)):
            raise ValueError(message + " (The active LoRA adapter has all-zero lora_B weights.)")
        return
    if ref_model is model:
        raise ValueError(message + " (`ref_model` is the same object as `model`.)")
    ref_params = dict(ref_model.named_parameters()) if ref_model is not None else {}
    for name, param in model.named_parameters():
        other = ref_params.get(name)
        if other is None or other.shape != param.shape:
            return
        if not torch.equal(param.detach(), other.detach().to(param.device)):
            return
    raise ValueError(message + " (Every parameter of `model` equals `ref_model`'s.)")


def check_inputs(
    model: Any,
    ref_model: Any | None,
    args: Any,
    train_dataset: Dataset | None,
    processing_class: PreTrainedTokenizerBase | None,
    peft_config: Any | None,
    sft_dataset: Dataset | None,
) -> None:
    """Everything about the trainer's inputs that can be refused before the parent builds anything."""
    if not isinstance(args, CreamConfig):
        raise TypeError(f"`args` must be a CreamConfig, got {type(args).__name__}.")
    validate_prompts(train_dataset, args.num_iterations)
    check_model_inputs(model, peft_config)
    check_tokenizer(processing_class, train_dataset["prompt"])
    if processing_class is not None:
        fit_prompts(
            tokenize_prompts(processing_class, train_dataset["prompt"]), args.max_length, args.max_new_tokens,
            args.long_prompts, "the prompts of train_dataset",
        )  # fmt: skip
    if sft_dataset is not None:
        validate_sft_dataset(sft_dataset)
        if ref_model is not None:
            raise ValueError(
                "With `sft_dataset`, `model` is M0 and π_0 is taken from it before the SFT stage: leave "
                "`ref_model=None`."
            )
        return
    use_peft = is_peft_model(model) or peft_config is not None
    if not use_peft and ref_model is None:
        raise ValueError(
            "Full fine-tuning needs the initial model π_0 (M0) as `ref_model`: CREAM's rewards are "
            "log π_t − log π_0. Pass ref_model=M0, pass `sft_dataset` to run the SFT stage from M0, or "
            "train LoRA adapters (π_0 is then the adapter-free base)."
        )
    check_distinct_from_initial(model, ref_model, peft_config)
