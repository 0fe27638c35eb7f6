"""Sampling and scoring costs that CreamTrainer's design choices depend on, as ratios measured in one run.

1. KV cache: TRL's online DPO trainer samples with `use_cache=False` when gradient checkpointing is on; CREAM's
   `generate_candidates` always keeps the cache. Ratio = time without cache / time with cache.
2. Scoring with `logits_to_keep` (only completion positions materialise logits) vs the full-sequence logits.

Usage: python benchmarks/bench_sampling.py [--device cuda] [--size smollm2|tiny] [--repeats 5]
Prints medians and ratios; absolute times depend on the machine, the ratios are the result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from trl_cream.modeling.scoring import completion_logps, pad_pairs

SIZES = {
    # SmolLM2-135M's architecture with random weights (no download needed).
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    a = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    config = LlamaConfig(**SIZES[a.size], max_position_embeddings=4096, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).to(a.device, dtype).eval()
    vocab = config.vocab_size
    ids = torch.randint(2, vocab, (a.prompts * a.num_generations, a.prompt_len), device=a.device)
    mask = torch.ones_like(ids)
    gen = dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)

    @torch.no_grad()
    def sample(use_cache: bool) -> None:
        model.generate(
            input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**gen, use_cache=use_cache)
        )

    sample(True)  # warm-up
    with_cache = median_seconds(lambda: sample(True), a.repeats)
    without_cache = median_seconds(lambda: sample(False), a.repeats)

    completions = torch.randint(2, vocab, (ids.shape[0], a.new_tokens), device=a.device)
    tensors = pad_pairs(ids.tolist(), completions.tolist(), 0, a.device)

    @torch.no_grad()
    def score_kept() -> None:
        completion_logps(model, *tensors)

    @torch.no_grad()
    def score_full() -> None:
        input_ids = torch.cat([tensors[0], tensors[2]], 1)
        logits = model(input_ids=input_ids, attention_mask=torch.cat([tensors[1], tensors[3]], 1)).logits.float()
        logits.log_softmax(-1)

    score_kept()
    kept = median_seconds(score_kept, a.repeats)
    full = median_seconds(score_full, a.repeats)
    seqs = ids.shape[0]
    print(f"model={a.size} device={a.device} dtype={dtype} sequences={seqs} prompt={a.prompt_len} new={a.new_tokens}")
    print(f"sampling  median s: cache on {with_cache:.3f} | cache off {without_cache:.3f} "
          f"| ratio off/on = {without_cache / with_cache:.2f}x")  # fmt: skip
    print(
        f"scoring   median s: logits_to_keep {kept:.3f} | full logits {full:.3f} | ratio full/kept {full / kept:.2f}x"
    )


if __name__ == "__main__":
    main()
