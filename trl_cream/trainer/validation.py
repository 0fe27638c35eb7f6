"""Up-front checks of the trainer's inputs (models, tokenizer, prompt lengths) and of each round's scores.

Every check raises before any expensive work (sampling, scoring, training) and before anything is written, with
what was wrong, the offending value and what to do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..engines import same_weights
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
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has a pad token ({tokenizer.pad_token!r}) but no eos "
            "token, so sampled candidates can never stop and are not marked as finished. Set an existing token as "
            "eos, e.g. tokenizer.eos_token = tokenizer.pad_token, or the model's end-of-turn token."
        )
    chat = next((i for i, p in enumerate(prompts) if isinstance(p, list)), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The prompts are chat messages (e.g. row {chat}) but the tokenizer has no chat template. Set "
            "tokenizer.chat_template (e.g. from the instruct model's tokenizer), or pass plain-string prompts."
        )


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, "config", None)


def _vocab_rows(model: Any) -> int | None:
    try:
        weight = model.get_input_embeddings().weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3: the whole shape, not the local shard
    except (AttributeError, NotImplementedError, IndexError):
        return None


def check_models_agree(model: Any, ref_model: Any | None, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """The policy, π_0 and the tokenizer share one vocabulary (and policy and π_0 one architecture): rewards are
    log π_t − log π_0 of the same token ids."""
    if isinstance(model, str) or not isinstance(model, nn.Module):
        return
    rows = _vocab_rows(model)
    if tokenizer is not None and rows is not None and len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but `model` embeds only {rows}: token ids >= {rows} would "
            "index past the embeddings. Pass the model's own tokenizer, or call model.resize_token_embeddings("
            "len(tokenizer)) before training (and on π_0)."
        )
    if ref_model is None or not isinstance(ref_model, nn.Module):
        return
    a, b = _base_config(model), _base_config(ref_model)
    kind_a, kind_b = getattr(a, "model_type", None), getattr(b, "model_type", None)
    if kind_a != kind_b:
        raise ValueError(
            f"`ref_model` (π_0) is a {kind_b!r} model but `model` is a {kind_a!r} model: CREAM's π_0 is the initial "
            "model M0 that the policy was trained from, with the same architecture and vocabulary. Pass M0 as "
            "ref_model."
        )
    ref_rows = _vocab_rows(ref_model)
    if rows is not None and ref_rows is not None and rows != ref_rows:
        raise ValueError(
            f"`ref_model` (π_0) embeds {ref_rows} tokens but `model` embeds {rows}: their log-probs are not over the "
            "same vocabulary. Pass the model M1 was trained from as ref_model (resize both to len(tokenizer) if "
            "you added tokens)."
        )
    if not is_peft_model(model) and not is_peft_model(ref_model):
        ref_shapes = {n: _shape(p) for n, p in ref_model.named_parameters()}
        for name, param in model.named_parameters():
            if name in ref_shapes and ref_shapes[name] != _shape(param):
                raise ValueError(
                    f"`ref_model` (π_0) is another architecture than `model`: {name} is {list(ref_shapes[name])} in "
                    f"π_0 but {list(_shape(param))} in the policy. π_0 is the model M0 the policy was trained from "
                    "(same architecture and sizes): pass M0 as ref_model."
                )


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the whole shape, not the local shard


def warn_half_precision_on_cpu(args: CreamConfig) -> None:
    """``bf16``/``fp16`` on a CPU-only run: said once, as the run then computes in float32 (the same numbers)."""
    on_cpu = args.use_cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    flags = [name for name in ("bf16", "fp16") if getattr(args, name, False)]
    if on_cpu and flags:
        logger.warning(
            "%s=True has no effect in this CPU run: the weights stay in the dtype the model was loaded in, and the "
            "losses equal float32's. Set %s=False, or load the model with dtype=torch.bfloat16 to train in half "
            "precision.",
            flags[0], flags[0],
        )  # fmt: skip


def check_context_window(model: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """Refuse prompts whose candidates would run past the model's `max_position_embeddings`."""
    limit = getattr(_base_config(model), "max_position_embeddings", None)
    if not isinstance(limit, int) or not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if len(prompt_ids[longest]) + max_new_tokens > limit:
        raise ValueError(
            f"Prompt {longest} has {len(prompt_ids[longest])} tokens; with max_new_tokens={max_new_tokens} its "
            f"candidates reach {len(prompt_ids[longest]) + max_new_tokens} positions, past the model's "
            f"max_position_embeddings={limit}. Set max_length <= {limit} (long prompts then keep their last tokens), "
            "lower max_new_tokens, or shorten those prompts."
        )


def check_prompts_fit(
    model: Any, tokenizer: PreTrainedTokenizerBase | None, prompts: Sequence[Any], args: CreamConfig
) -> None:
    """The prompts, tokenized as round 1 will, against `max_length` (`long_prompts`) and the model's context window."""
    if tokenizer is None:
        return
    fitted = fit_prompts(
        tokenize_prompts(tokenizer, prompts), args.max_length, args.max_new_tokens, args.long_prompts,
        "the prompts of train_dataset",
    )  # fmt: skip
    check_context_window(model, fitted, args.max_new_tokens)


def check_quantized_blocks(model: Any) -> None:
    """A 4-bit (bitsandbytes) layer on the CPU whose input width is not a multiple of its quantization block: the
    CPU kernels cannot run it. 4-bit on the CPU with fitting widths works."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        width = getattr(module, "in_features", None)
        blocksize = getattr(state, "blocksize", None)
        if state is None or not width or not blocksize or module.weight.device.type != "cpu":
            continue
        if width % blocksize:
            raise ValueError(
                f"`{name}` is a 4-bit layer with {width} input features, which is not a multiple of bitsandbytes' "
                f"quantization block ({blocksize}): its CPU kernels cannot run it (the hidden size is below or off "
                "the block). Load the model without 4-bit quantization, use a model whose hidden size is a "
                f"multiple of {blocksize}, or train on a GPU."
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
    if ref_model is not None and same_weights(model, ref_model):  # compared whole under ZeRO-3 / FSDP
        raise ValueError(message + " (Every parameter of `model` equals `ref_model`'s.)")


# ---------------------------------------------------------------- during the run
def check_single_train(called: bool, output_dir: str) -> None:
    """One run per `train()`: a second call would start over from the trained policy and replace the first run."""
    if called:
        raise RuntimeError(
            "train() was already called on this CreamTrainer: its policy is now the trained model, so a second call "
            f"would start a new run from it and replace the first run in {output_dir}. Build a new CreamTrainer "
            "from the original M1 and π_0 to run again (with resume_from_checkpoint=True to continue an interrupted "
            "run), or load the result from output_dir."
        )


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (this process's ZeRO-3 partition when partitioned)."""
    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = getattr(param, "ds_tensor", param)
            if tensor.numel() and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


def check_training_finite(
    accelerator: Any, model: nn.Module, loss: float, round_index: int, args: CreamConfig
) -> None:
    """After a round's training and before ``M<t+1>`` is saved: refuse non-finite weights or a non-finite loss, so
    that a diverged model is never saved, pushed or marked done (every process reaches the same verdict)."""
    bad = nonfinite_weights(accelerator.unwrap_model(model))
    loss_bad = not math.isfinite(loss)
    flag = torch.tensor([float(bool(bad) or loss_bad)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if not flag.item():
        return
    what = []
    if bad:
        what.append(f"{len(bad)} weight tensor(s) of the policy are NaN or inf (first: {bad[0]})")
    if loss_bad:
        what.append(f"the mean training loss is {loss}")
    raise FloatingPointError(
        f"Round {round_index} diverged: {' and '.join(what) or 'another process found NaN/inf weights'}, with "
        f"learning_rate={args.learning_rate} and max_grad_norm={args.max_grad_norm}. M{round_index + 1} is not "
        f"saved and nothing of round {round_index} is marked done; the last good iteration stays the run's latest. "
        "Lower learning_rate (the paper uses 1e-6), keep gradient clipping on (max_grad_norm=1.0), or train in "
        "float32 (bf16=False); then start again with overwrite_output_dir=True or in a new output_dir (a resume "
        "must keep the same settings)."
    )


def check_inputs(
    model: Any,
    ref_model: Any | None,
    args: CreamConfig | None,
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
    check_models_agree(model, ref_model, processing_class)
    warn_half_precision_on_cpu(args)
    check_quantized_blocks(model)
    check_prompts_fit(model, processing_class, train_dataset["prompt"], args)
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
