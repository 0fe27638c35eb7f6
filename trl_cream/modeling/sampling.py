"""Sampling N candidates per prompt with a causal LM (Algorithm 1 line 5); scoring them is in
`trl_cream.modeling.scoring`.

These functions take a plain (unwrapped) model and a tokenizer, so the trainer, the evaluation harness and
every generation backend share one definition of "the candidates of a prompt".
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import maybe_apply_chat_template

from .paged import generate_paged

TokenIds = list[int]


@runtime_checkable
class SamplingArgs(Protocol):
    """The fields [`SamplingSettings.from_args`] reads, typed as `CreamConfig` declares them (which satisfies this
    structurally, so this layer imports nothing of the trainer's)."""

    num_generations: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    max_new_tokens: int
    generation_kwargs: dict | None
    generation_batch_size: int
    generation_backend: str


@dataclass(frozen=True)
class SamplingSettings:
    """How a CREAM round samples its candidates: the decoding fields, how many per prompt, and with which backend.

    Build it from a `CreamConfig` with [`SamplingSettings.from_args`]; [`generation_config`] turns it into the
    `GenerationConfig` that every backend receives.

    Attributes:
        num_generations (`int`): candidates per prompt (N).
        temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens: the decoding fields of `CreamConfig`
            (``top_k=None`` or ``0`` and ``repetition_penalty=1.0`` mean "off").
        generation_kwargs (`dict` or `None`): any other `GenerationConfig` field, applied last.
        batch_size (`int`): prompts per `generate` call (``generation_batch_size``; the paged backend schedules
            sequences itself).
        backend (`str`): a key of [`GENERATION_BACKENDS`] (``generation_backend``).
    """

    num_generations: int
    temperature: float
    top_p: float
    top_k: int | None
    min_p: float | None
    repetition_penalty: float
    max_new_tokens: int
    generation_kwargs: dict[str, Any] | None = None
    batch_size: int = 8
    backend: str = "generate"

    @classmethod
    def from_args(cls, args: SamplingArgs) -> SamplingSettings:
        """The sampling fields of a `CreamConfig` (or any object with its field names, [`SamplingArgs`])."""
        return cls(
            num_generations=args.num_generations,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            max_new_tokens=args.max_new_tokens,
            generation_kwargs=dict(args.generation_kwargs) if args.generation_kwargs else None,
            batch_size=args.generation_batch_size,
            backend=args.generation_backend,
        )

    def generation_config(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int]) -> GenerationConfig:
        """[`sampling_generation_config`] for these settings, with ``tokenizer``'s pad and bos ids."""
        return sampling_generation_config(self, eos_token_ids, tokenizer.pad_token_id, tokenizer.bos_token_id)


class GenerationBackend(Protocol):
    """One way of sampling: ``num_generations`` completions per prompt, as raw token rows (prompt-major: the rows of
    prompt ``p`` are ``rows[p * num_generations : (p + 1) * num_generations]``), not yet cut at the stop token.

    ``generation_config`` is a private copy (``use_cache=True``) that the backend may change; the model is in eval
    mode with its own generation config hidden. A backend that can record each candidate's summed log-prob under the
    sampling model extends ``logps_out`` (when given) with one list of ``num_generations`` floats per prompt; one
    that cannot leaves it empty, and π_t is then scored by a forward pass.
    """

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[TokenIds],
        num_generations: int,
        generation_config: GenerationConfig,
        batch_size: int,
        show_progress: bool,
        desc: str,
        logps_out: list[list[float]] | None,
    ) -> list[TokenIds]: ...


# What happens to a prompt too long for max_length − max_new_tokens: left-truncated, or an error.
LONG_PROMPT_MODES: tuple[str, ...] = ("truncate", "error")


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


def left_pad(seqs: Sequence[TokenIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into ``(ids, attention_mask)`` tensors (an empty row is all padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
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


def sampling_generation_config(
    args: SamplingSettings,
    eos_token_ids: int | Sequence[int] | None,
    pad_token_id: int,
    bos_token_id: int | None = None,
) -> GenerationConfig:
    """The candidates' sampling settings, built from the CREAM config alone.

    Every decoding knob that `CreamConfig` has is set explicitly (``top_k=0`` and ``repetition_penalty=1.0`` mean
    "off"), then `generation_kwargs` is applied on top. Nothing comes from ``model.generation_config``:
    [`generate_candidates`] also hides the model's own generation config while it samples (see
    [`isolated_generation_config`]).
    """
    values: dict[str, Any] = {
        "do_sample": True,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k if args.top_k is not None else 0,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "num_return_sequences": 1,
        "eos_token_id": [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or []) or None,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "use_cache": True,
    }
    values.update(args.generation_kwargs or {})
    return GenerationConfig(**values)


@contextmanager
def isolated_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the model's own ``generation_config`` for the duration of the block.

    transformers 5 merges ``model.generation_config`` into the config passed to ``generate``: every field left
    ``None`` there (e.g. ``min_p``, ``suppress_tokens``, ``no_repeat_ngram_size``) takes the model's value, and
    fields the model does not set take transformers' global defaults. Replacing the model's config by an empty
    `GenerationConfig` leaves only the passed config and those (neutral) global defaults; the model's config is put
    back afterwards, so a saved checkpoint keeps its own inference settings. A PEFT model's inner model is the one
    whose config ``generate`` reads.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(inner, "generation_config", None)
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = original


def _stop_ids(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    stop = generation_config.eos_token_id
    return [stop] if isinstance(stop, int) else list(stop or [tokenizer.eos_token_id])


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
    backend: str = "generate",
    logps_out: list[list[float]] | None = None,
) -> list[list[TokenIds]]:
    """Sample ``num_generations`` completions for each prompt.

    Only ``generation_config`` decides how (the model's own generation config is hidden meanwhile). The model runs in
    eval mode and the KV cache is always on (``use_cache=True``), whatever the training-time gradient checkpointing
    setting. ``backend`` picks the engine (both give the same output format):

    - ``"generate"``: ``model.generate`` on left-padded batches of ``batch_size`` prompts (× ``num_generations``);
    - ``"paged"``: transformers' continuous batching, ``model.generate_batch``, on all the prompts at once
      (``batch_size`` is not used: the engine schedules sequences itself).

    With ``logps_out`` (a list), ``generate`` also returns its raw logits (``output_logits=True``: before temperature
    and top-p) and ``logps_out`` is extended with each candidate's ``Σ_k log π(y_k | x, y_<k)`` under the sampling
    model, ``[num_prompts][num_generations]`` floats: the policy's score without a separate forward pass. It keeps
    ``batch_size × num_generations × max_new_tokens × vocab`` float32 logits in memory per call.

    Returns:
        ``[num_prompts][num_generations]`` lists of completion token ids, each ending at its first stop token.
    """
    run = GENERATION_BACKENDS.get(backend)
    if run is None:
        hint = " (vLLM samples through trl_cream.modeling.vllm_backend.VLLMSampler)" if backend == "vllm" else ""
        raise ValueError(f"backend={backend!r} is unknown; choose one of {', '.join(GENERATION_BACKENDS)}{hint}.")
    generation_config = copy.deepcopy(generation_config)
    generation_config.use_cache = True
    if not prompt_ids:
        return []
    with eval_mode(model), isolated_generation_config(model):
        rows = run(
            model,
            tokenizer,
            prompt_ids,
            num_generations,
            generation_config,
            batch_size,
            show_progress,
            desc,
            logps_out,
        )
    stop_ids, pad_id = _stop_ids(generation_config, tokenizer), pad_token_id(tokenizer)
    rows = [cut_at_stop(row, stop_ids, pad_id) for row in rows]
    return [rows[p * num_generations : (p + 1) * num_generations] for p in range(len(prompt_ids))]


def _generate_padded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[TokenIds],
    num_generations: int,
    generation_config: GenerationConfig,
    batch_size: int,
    show_progress: bool,
    desc: str,
    logps_out: list[list[float]] | None = None,
) -> list[TokenIds]:
    """The ``"generate"`` backend: ``model.generate`` on left-padded batches of ``batch_size`` prompts (each repeated
    ``num_generations`` times); with ``logps_out``, also the raw logits of every step (before temperature and top-p),
    summed into each candidate's log-prob."""
    if logps_out is not None:
        generation_config.output_logits = generation_config.return_dict_in_generate = True
    pad_id, stop_ids = pad_token_id(tokenizer), _stop_ids(generation_config, tokenizer)
    device = next(model.parameters()).device
    rows: list[TokenIds] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, unit="batch", disable=not show_progress):
        chunk = prompt_ids[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        ids = ids.repeat_interleave(num_generations, 0).to(device)
        mask = mask.repeat_interleave(num_generations, 0).to(device)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
        sequences = generated.sequences if logps_out is not None else generated
        completions = sequences[:, ids.shape[1] :]
        rows.extend(completions.tolist())
        if logps_out is not None:
            lengths = [len(cut_at_stop(row, stop_ids, pad_id)) for row in completions.tolist()]
            sums = _sampled_logps(generated.logits, completions, lengths)
            logps_out.extend(sums[p * num_generations : (p + 1) * num_generations] for p in range(len(chunk)))
    return rows


# Where a generation backend plugs in: its name (`CreamConfig.generation_backend`, checked against these keys) and the
# function that samples. `model.generate` on left-padded batches, or transformers' continuous batching
# (`model.generate_batch`, paged attention), which schedules sequences individually and needs no padding. A new
# backend is one function with the `GenerationBackend` signature and one entry here.
GENERATION_BACKENDS: dict[str, GenerationBackend] = {"generate": _generate_padded, "paged": generate_paged}
# Backends that are an engine the trainer holds across rounds rather than a function of a transformers model: vLLM
# (`modeling/vllm_backend.py`, driven by `trainer/vllm_engine.py`). `generation_backend` takes any of BACKEND_NAMES.
ENGINE_BACKENDS: tuple[str, ...] = ("vllm",)
BACKEND_NAMES: tuple[str, ...] = (*GENERATION_BACKENDS, *ENGINE_BACKENDS)


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
