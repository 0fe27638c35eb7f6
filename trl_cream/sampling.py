"""Sampling N candidates per prompt and scoring them with a causal LM (Algorithm 1 lines 5, 6 and 8).

These functions take a plain (unwrapped) model and a tokenizer, so the trainer, the evaluation harness and
any other generation backend (e.g. vLLM) share one definition of "the log-probability of a completion".
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import maybe_apply_chat_template

TokenIds = list[int]


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any]) -> list[TokenIds]:
    """Token ids of each prompt: chat messages go through the chat template (with the generation prompt)."""
    texts = [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, falling back to eos (an existing token: no embedding resize)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token` first.")
    return pad


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block in eval mode (no dropout), then restore the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _left_pad(seqs: Sequence[TokenIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _right_pad(seqs: Sequence[TokenIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int], pad_id: int) -> TokenIds:
    """Keep a generated completion up to and including its first stop token; drop the padding after it."""
    out: TokenIds = []
    for token in ids:
        out.append(int(token))
        if token in stop_ids:
            return out
    while out and out[-1] == pad_id and pad_id not in stop_ids:
        out.pop()
    return out


@torch.no_grad()
def generate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[TokenIds],
    num_generations: int,
    generation_config: GenerationConfig,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "sampling",
    logps_out: list[list[float]] | None = None,
) -> list[list[TokenIds]]:
    """Sample ``num_generations`` completions for each prompt, ``batch_size`` prompts per ``generate`` call.

    The model runs in eval mode and the KV cache is always on (``use_cache=True``), whatever the training-time
    gradient checkpointing setting.

    With ``logps_out`` (a list), ``generate`` also returns its raw logits (``output_logits=True``: before temperature
    and top-p) and ``logps_out`` is extended with each candidate's ``Σ_k log π(y_k | x, y_<k)`` under the sampling
    model, ``[num_prompts][num_generations]`` floats: the policy's score without a separate forward pass. It keeps
    ``batch_size × num_generations × max_new_tokens × vocab`` float32 logits in memory per call.

    Returns:
        ``[num_prompts][num_generations]`` lists of completion token ids, each ending at its first stop token.
    """
    pad_id = pad_token_id(tokenizer)
    stop = generation_config.eos_token_id
    stop_ids = [stop] if isinstance(stop, int) else list(stop or [tokenizer.eos_token_id])
    device = next(model.parameters()).device
    generation_config = copy.deepcopy(generation_config)
    generation_config.use_cache = True
    if logps_out is not None:  # the raw (unprocessed) logits of every step, to score the samples
        generation_config.output_logits = generation_config.return_dict_in_generate = True
    out: list[list[TokenIds]] = []
    starts = range(0, len(prompt_ids), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
            chunk = prompt_ids[start : start + batch_size]
            ids, mask = _left_pad(chunk, pad_id)
            ids = ids.repeat_interleave(num_generations, 0).to(device)
            mask = mask.repeat_interleave(num_generations, 0).to(device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
            sequences = generated.sequences if logps_out is not None else generated
            completions = sequences[:, ids.shape[1] :]
            kept = [cut_at_stop(row, stop_ids, pad_id) for row in completions.tolist()]
            out.extend(kept[p * num_generations : (p + 1) * num_generations] for p in range(len(chunk)))
            if logps_out is not None:
                sums = _sampled_logps(generated.logits, completions, [len(row) for row in kept])
                logps_out.extend(sums[p * num_generations : (p + 1) * num_generations] for p in range(len(chunk)))
    return out


def _sampled_logps(logits: Sequence[torch.Tensor], tokens: torch.Tensor, lengths: Sequence[int]) -> list[float]:
    """Σ of the log-softmax of the raw per-step ``logits`` at the generated ``tokens``, over each row's first
    ``lengths[i]`` steps."""
    totals = torch.zeros(tokens.shape[0], dtype=torch.float64)
    for step, step_logits in enumerate(logits):
        live = torch.tensor([step < n for n in lengths])
        if not live.any():
            break
        step_logits = step_logits.float()
        token = tokens[:, step].to(step_logits.device).unsqueeze(-1)
        logp = (step_logits.gather(-1, token).squeeze(-1) - step_logits.logsumexp(-1)).double().cpu()
        totals += torch.where(live, logp, torch.zeros_like(logp))
    return totals.float().tolist()


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token ``log π(y_k | x, y_<k)`` of right-padded completions after left-padded prompts.

    Position ids follow the attention mask, so a sequence gets the same positions whatever padding its batch
    needs. Only the completion positions' logits are materialised (``logits_to_keep``).

    Returns:
        `torch.Tensor`: ``[batch, completion_len]`` log-probs, 0 at padding positions.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    width = completion_ids.shape[1]
    logits = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1)
        .logits[:, :-1]
        .float()
    )
    token_logps = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return token_logps * completion_mask


def pad_pairs(
    prompts: Sequence[TokenIds], completions: Sequence[TokenIds], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad the prompts and right-pad the completions into model-ready tensors on ``device``."""
    p_ids, p_mask = _left_pad(prompts, pad_id)
    c_ids, c_mask = _right_pad(completions, pad_id)
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


def truncate_prompts(prompts: Sequence[TokenIds], completions: Sequence[TokenIds], max_length: int) -> list[TokenIds]:
    """Drop the oldest prompt tokens so that prompt + completion fits ``max_length`` (the completion is kept)."""
    return [p[max(0, len(p) + len(c) - max_length) :] for p, c in zip(prompts, completions, strict=True)]


@torch.no_grad()
def score_candidates(
    model: torch.nn.Module,
    prompt_ids: Sequence[TokenIds],
    candidates: Sequence[Sequence[TokenIds]],
    pad_id: int,
    max_length: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """``Σ_k log π(y_ij,k | x_j, y_ij,<k)`` for every candidate: a ``[num_prompts, N]`` float32 tensor on CPU.

    Identical candidates of one prompt are scored once and share the score, so exact duplicates are exact ties.
    Sequences are batched by length to limit padding.
    """
    device = next(model.parameters()).device
    unique: dict[tuple[int, tuple[int, ...]], int] = {}
    for j, cands in enumerate(candidates):
        for cand in cands:
            unique.setdefault((j, tuple(cand)), len(unique))
    keys = sorted(unique, key=lambda k: len(prompt_ids[k[0]]) + len(k[1]))
    scores = torch.zeros(len(unique))
    with eval_mode(model):
        starts = range(0, len(keys), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
            batch = keys[start : start + batch_size]
            completions = [list(c) for _, c in batch]
            prompts = truncate_prompts([prompt_ids[j] for j, _ in batch], completions, max_length)
            logps = completion_logps(model, *pad_pairs(prompts, completions, pad_id, device)).sum(-1)
            scores[[unique[k] for k in batch]] = logps.float().cpu()
    return torch.stack(
        [torch.stack([scores[unique[(j, tuple(c))]] for c in cands]) for j, cands in enumerate(candidates)]
    )
