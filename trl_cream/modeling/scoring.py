"""Scoring candidates with a causal LM (Algorithm 1 lines 6 and 8): the log-probability of a completion after its
prompt, as the trainer's loss, the scoring phase, the evaluation harness and the ranking evaluation compute it.

These functions take a plain (unwrapped) model, so every caller shares one definition of "the log-probability of a
completion".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .sampling import TokenIds, eval_mode, left_pad


def right_pad(seqs: Sequence[TokenIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(ids, attention_mask)`` tensors, at least one column wide."""
    width = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


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
    p_ids, p_mask = left_pad(prompts, pad_id)
    c_ids, c_mask = right_pad(completions, pad_id)
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
