"""Sampling throughput of the two `generation_backend`s: `model.generate` (padded batches) vs `generate_batch`.

Both go through `trl_cream.modeling.sampling.generate_candidates`, exactly as a CREAM round calls it. Decoding is
greedy by default, so both backends produce the same sequences (tested in tests/test_sampling.py) and do the same work;
`--sample` uses the paper's T = 0.8, top-p 0.95 instead (lengths then differ between backends: compare tokens/s).

    python benchmarks/generation_backends.py                       # tiny random Llama, CPU
    python benchmarks/generation_backends.py --model smollm2-arch  # SmolLM2-135M's architecture, random weights
    python benchmarks/generation_backends.py --model smollm2       # the offline SmolLM2-135M-Instruct asset

Prints the median of `--repeats` timed runs (after one warm-up run) per backend, and the ratio paged / generate.
Absolute figures depend on the machine and its load; the ratio is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from trl_cream.modeling.sampling import GENERATION_BACKENDS, generate_candidates

ARCHITECTURES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "smollm2-arch": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
}  # fmt: skip


def load_model(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, int, int]:
    """The model, its eos id and its vocabulary size."""
    if name == "smollm2":
        from trl_cream.recipes import assets

        model = AutoModelForCausalLM.from_pretrained(assets.smollm2_model_dir(), dtype=dtype)
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
    else:
        torch.manual_seed(0)
        config = LlamaConfig(**ARCHITECTURES[name], max_position_embeddings=4096, eos_token_id=1, pad_token_id=0)
        model, eos = LlamaForCausalLM(config).to(dtype), 1
    return model.to(device).eval(), eos, model.config.vocab_size


class _Tokenizer:
    """The two attributes `generate_candidates` reads from a tokenizer."""

    def __init__(self, eos: int) -> None:
        self.eos_token_id = self.pad_token_id = eos


def timed(fn, device: str) -> tuple[float, list]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*ARCHITECTURES, "smollm2"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=32, help="Longest prompt; lengths vary from half of it.")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts per call of the 'generate' backend.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", action="store_true", help="Sample (T=0.8, top-p 0.95) instead of greedy.")
    a = parser.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model, eos, vocab = load_model(a.model, a.device, dtype)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, a.prompt_len // 2), a.prompt_len + 1, (a.prompts,), generator=generator)
    prompt_ids = [torch.randint(2, vocab, (int(n),), generator=generator).tolist() for n in lengths]
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95) if a.sample else dict(do_sample=False)
    config = GenerationConfig(**sampling, max_new_tokens=a.new_tokens, eos_token_id=[eos], pad_token_id=eos)
    tokenizer = _Tokenizer(eos)

    print(
        f"model={a.model} device={a.device} dtype={dtype} prompts={a.prompts} x N={a.num_generations} "
        f"prompt<={a.prompt_len} new<={a.new_tokens} {'sampled' if a.sample else 'greedy'}, median of {a.repeats}"
    )
    rates: dict[str, float] = {}
    for backend in GENERATION_BACKENDS:

        def run(backend: str = backend) -> list:
            torch.manual_seed(0)
            return generate_candidates(
                model, tokenizer, prompt_ids, a.num_generations, config, a.batch_size, False, backend=backend
            )

        run()  # warm-up
        results = [timed(run, a.device) for _ in range(a.repeats)]
        seconds = statistics.median(t for t, _ in results)
        candidates = results[0][1]
        sequences = sum(len(c) for c in candidates)
        tokens = sum(len(seq) for c in candidates for seq in c)
        rates[backend] = sequences / seconds
        print(
            f"{backend:>8}: median {seconds:.3f} s | {sequences / seconds:.1f} sequences/s | "
            f"{tokens / seconds:.0f} tokens/s ({tokens} tokens)"
        )
    print(f"ratio paged / generate (sequences/s): {rates['paged'] / rates['generate']:.2f}x")


if __name__ == "__main__":
    main()
