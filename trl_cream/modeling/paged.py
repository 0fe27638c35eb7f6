"""The ``"paged"`` generation backend: transformers' continuous batching (``model.generate_batch``, paged attention),
which schedules sequences individually and needs no padding (registered in `trl_cream.modeling.sampling`'s
``GENERATION_BACKENDS``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

TokenIds = list[int]


# Memory that the paged KV cache may take when the model is not on an accelerator. transformers sizes the cache from
# the device's free memory, which on CPU means ~90 % of the machine's RAM (minutes of zero-filling, and a hazard on a
# shared machine); off-accelerator the cache is sized to the workload instead, up to this budget.
PAGED_CPU_CACHE_BYTES = 1 << 30


def paged_batching_config(
    model: PreTrainedModel, prompt_ids: Sequence[TokenIds], max_new_tokens: int, seed: int
) -> ContinuousBatchingConfig:
    """The continuous-batching settings of one `generate_batch` call.

    ``seed`` seeds the engine's sampler (drawn from torch's global generator by the caller, so sampling is reproducible
    under `transformers.set_seed`). On an accelerator the KV cache is left to transformers' sizing (a share of the free
    memory); elsewhere it holds every sequence of the workload at once, capped at [`PAGED_CPU_CACHE_BYTES`] (requests
    beyond it wait for a free block), and a batch holds at most 1024 tokens (longer prompts are prefilled in chunks).
    """
    cb_config = ContinuousBatchingConfig(seed=seed)
    if next(model.parameters()).device.type != "cpu":
        return cb_config
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    itemsize = next(model.parameters()).element_size()
    block_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize * cb_config.page_size
    blocks_per_sequence = [-(-(len(ids) + max_new_tokens) // cb_config.page_size) for ids in prompt_ids]
    cb_config.num_blocks = max(
        max(blocks_per_sequence), min(sum(blocks_per_sequence), PAGED_CPU_CACHE_BYTES // block_bytes)
    )
    cb_config.max_batch_tokens = min(1024, sum(len(ids) for ids in prompt_ids))
    return cb_config


def generate_paged(
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
    """The ``"paged"`` backend: transformers' continuous batching (``model.generate_batch``, paged attention) on all
    the prompts at once. It returns no logits, so ``logps_out`` stays empty."""
    if not hasattr(model, "generate_batch"):
        raise TypeError(
            f"generation_backend='paged' needs transformers' continuous batching (`generate_batch`), which "
            f"{type(model).__name__} does not have; use generation_backend='generate'."
        )
    inputs = [list(ids) for ids in prompt_ids for _ in range(num_generations)]
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    cb_config = paged_batching_config(model, inputs, generation_config.max_new_tokens or 0, seed)
    warmup = next(model.parameters()).device.type == "cuda"  # warm-up captures CUDA graphs; on CPU it only costs
    outputs = model.generate_batch(
        inputs=inputs,
        generation_config=generation_config,
        continuous_batching_config=cb_config,
        progress_bar=show_progress,
        warmup=warmup,
    )
    results = list(outputs.values())
    failed = [r.error for r in results if getattr(r, "error", None) is not None]
    if len(results) != len(inputs) or failed:
        raise RuntimeError(
            f"{desc}: continuous batching returned {len(results)} of {len(inputs)} sequences"
            + (f" ({len(failed)} failed, first error: {failed[0]})" if failed else "")
            + "; generation_backend='generate' is the fallback."
        )
    return [list(r.generated_tokens) for r in results]
