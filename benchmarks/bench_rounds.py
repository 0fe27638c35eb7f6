"""Two CREAM rounds end to end on the available device, full fine-tuning and LoRA, with per-phase timings.

Uses SmolLM2-135M's architecture with random weights (no download) and the test tokenizer, so it runs anywhere;
on a GPU it exercises the CUDA path (bf16, gradient checkpointing with KV-cache sampling, π_{t−1} reloaded to the
device) that the CPU test suite cannot. Prints per-phase seconds and, on CUDA, the peak memory of each run.

Usage: python benchmarks/bench_rounds.py [--prompts 32] [--num_generations 4] [--new_tokens 64] [--modes ...]
(`qlora` needs CUDA and bitsandbytes: a 4-bit base, a LoRA SFT stage M0 -> M1, then the rounds.)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trl_cream import CreamConfig, CreamTrainer

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny_tokenizer"


def smollm2_like(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=vocab, max_position_embeddings=2048, eos_token_id=2, pad_token_id=2, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def run(mode: str, a: argparse.Namespace, tok, prompts: Dataset, out: Path) -> dict:
    cuda = torch.cuda.is_available()
    m0 = smollm2_like(len(tok))
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.01 * torch.randn_like(p))
    args = CreamConfig(
        output_dir=str(out / mode), num_iterations=2, num_generations=a.num_generations, max_new_tokens=a.new_tokens,
        max_length=512, per_device_train_batch_size=4, learning_rate=1e-5, warmup_steps=0, bf16=cuda,
        use_cpu=not cuda, gradient_checkpointing=cuda, report_to="none", logging_steps=1, disable_tqdm=True,
        generation_batch_size=16, scoring_batch_size=32, seed=0,
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "full":
        trainer = CreamTrainer(model=m1, ref_model=m0, args=args, train_dataset=prompts, processing_class=tok)
    elif mode == "qlora":  # 4-bit base + SFT stage (M0 -> M1) + rounds: the consumer-GPU path (needs CUDA)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        m0.save_pretrained(out / "m0_fp")
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(out / "m0_fp", quantization_config=bnb, device_map={"": 0})
        sft = Dataset.from_dict(
            {"messages": [p + [{"role": "assistant", "content": "The answer is 7."}] for p in prompts["prompt"]]}
        )
        args.sft_learning_rate, args.sft_num_train_epochs = 1e-3, 1.0
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        trainer = CreamTrainer(
            model=base, args=args, train_dataset=prompts, processing_class=tok, peft_config=lora, sft_dataset=sft
        )
    else:
        policy = get_peft_model(m0, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():  # M1 = a non-identity adapter, as after an SFT stage
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        trainer = CreamTrainer(model=policy, args=args, train_dataset=prompts, processing_class=tok)
    start = time.perf_counter()
    output = trainer.train()
    total = time.perf_counter() - start
    rounds = output.metrics["rounds"]
    assert all((out / mode / f"M{k}").is_dir() for k in (1, 2, 3))
    result = {
        "mode": mode,
        "total_s": round(total, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "rounds": [
            {k: r[k] for k in ("round", "consistency", "num_pairs", "num_tied_skipped", "train_loss")}
            | {p: r[f"time_{p}_s"] for p in ("generate", "score", "pair", "train", "save")}
            for r in rounds
        ],
    }
    del trainer, m0, m1
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora", "qlora"])
    a = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    questions = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(a.prompts)]
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device={device} prompts={a.prompts} N={a.num_generations} new_tokens={a.new_tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            print(json.dumps(run(mode, a, tok, prompts, Path(tmp))))


if __name__ == "__main__":
    main()
