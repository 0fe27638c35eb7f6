"""CREAM on Llama-3-8B-Instruct, the paper's recipe (Section 4.1), with QLoRA (NF4) on each GPU.

Data, as in the paper: ~3.4K seed SFT examples from Open Assistant (top-ranked English replies) and ~21K unlabelled
prompts: the seed prompts plus the train questions (labels dropped) of ARC-Easy/Challenge, OpenBookQA, SIQA and
GSM8K, split equally across the 2 CREAM iterations.

    python examples/cream_llama3.py                          # prepare the data, SFT M0 -> M1, CREAM M1 -> M2 -> M3
    python examples/cream_llama3.py --prepare_only           # only write cream_llama3_data/{sft,prompts}
    python examples/cream_llama3.py --num_train_epochs 1 ... # any CreamConfig / ModelConfig field as a flag
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/cream_llama3.py
                                                             # several GPUs: each rank samples its share of a round
    python examples/cream_llama3.py --sft_data_path my/sft --prompts_data_path my/prompts   # local datasets

Defaults follow the paper: N=5 candidates at temperature 0.8 (top-p 0.95), β=0.1, AdamW at 1e-6 with warm-up 0.1,
one epoch a round, 3 SFT epochs at 1e-6. M0 is Meta-Llama-3-8B-Instruct (changed from the base Meta-Llama-3-8B:
issue #6 names it; the paper does not name its exact checkpoint). The learning rates are the paper's (CREAM's
own code trains LoRA adapters too); a QLoRA adapter moves slowly at 1e-6, so raise them
(e.g. `--learning_rate 2e-5 --sft_learning_rate 1e-4`, this script's earlier defaults) if M2 barely differs from M1.
Without a GPU (or with `--use_cpu true`), 4-bit cannot be trained on CPU in a useful time: pass
`--load_in_4bit false`.

Then evaluate: `trl-cream eval --checkpoints M0=meta-llama/Meta-Llama-3-8B-Instruct M1=cream_llama3/M1
M2=cream_llama3/M2 M3=cream_llama3/M3 --size full`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset, concatenate_datasets, load_dataset, load_from_disk

from trl_cream import CreamConfig
from trl_cream.recipes.demo_data import format_gsm8k, format_mc

LLAMA3_DEFAULTS = dict(
    model_name_or_path="meta-llama/Meta-Llama-3-8B-Instruct",
    dtype="bfloat16",
    load_in_4bit=True,
    use_peft=True,
    lora_r=64,
    lora_alpha=128,
    lora_target_modules=["all-linear"],
    output_dir="cream_llama3",
    num_iterations=2,
    num_generations=5,
    temperature=0.8,
    top_p=0.95,
    max_new_tokens=512,
    max_length=1536,
    beta=[0.1],
    learning_rate=1e-6,  # the paper's rate (CREAM's own code trains LoRA too); see the docstring to raise it
    sft_learning_rate=1e-6,
    sft_num_train_epochs=3.0,
    num_train_epochs=1.0,
    warmup_steps=0.1,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=8,
    generation_batch_size=16,
    scoring_batch_size=8,
    bf16=True,
    gradient_checkpointing=True,
    logging_steps=10,
)


@dataclass
class RecipeArguments:
    """Data options of the recipe."""

    data_dir: str = field(default="cream_llama3_data", metadata={"help": "Where the prepared datasets are written."})
    num_sft: int = field(default=3400, metadata={"help": "Seed SFT examples from Open Assistant (paper: ~3.4K)."})
    num_prompts: int = field(default=21000, metadata={"help": "Unlabelled prompts over all rounds (paper: ~21K)."})
    prepare_only: bool = field(default=False, metadata={"help": "Write the datasets and stop."})
    sft_data_path: str | None = field(
        default=None,
        metadata={"help": "A local `save_to_disk` SFT dataset (`messages` column) to use instead of Open Assistant."},
    )
    prompts_data_path: str | None = field(
        default=None,
        metadata={"help": "A local `save_to_disk` prompt dataset (`prompt` column) to use instead of the five tasks."},
    )


def oasst_seed_sft(n: int, seed: int) -> Dataset:
    """Top-ranked English assistant replies to a first user turn, as two-message conversations."""
    raw = load_dataset("OpenAssistant/oasst1", split="train")
    prompts = {r["message_id"]: r["text"] for r in raw if r["role"] == "prompter" and r["parent_id"] is None}
    rows = [
        [{"role": "user", "content": prompts[r["parent_id"]]}, {"role": "assistant", "content": r["text"]}]
        for r in raw
        if r["role"] == "assistant" and r["rank"] == 0 and r["lang"] == "en" and r["parent_id"] in prompts
    ]
    random.Random(seed).shuffle(rows)
    return Dataset.from_dict({"messages": rows[:n]})


def task_prompts() -> Dataset:
    """Train questions of the five tasks, in the answer format the evaluation expects, labels dropped."""
    texts: list[str] = []
    for config in ("ARC-Easy", "ARC-Challenge"):
        for r in load_dataset("allenai/ai2_arc", config, split="train"):
            texts.append(format_mc(r["question"], r["choices"]["text"]))
    for r in load_dataset("allenai/openbookqa", "main", split="train"):
        texts.append(format_mc(r["question_stem"], r["choices"]["text"]))
    for r in load_dataset("allenai/social_i_qa", split="train"):
        texts.append(format_mc(f"{r['context']} {r['question']}", [r["answerA"], r["answerB"], r["answerC"]]))
    for r in load_dataset("openai/gsm8k", "main", split="train"):
        texts.append(format_gsm8k(r["question"]))
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})


def prepare(recipe: RecipeArguments, seed: int) -> tuple[Dataset, Dataset]:
    """Build the seed SFT data and the prompts (downloads) and write them to ``recipe.data_dir``."""
    sft = oasst_seed_sft(recipe.num_sft, seed)
    seed_prompts = Dataset.from_dict({"prompt": [m[:1] for m in sft["messages"]]})
    prompts = concatenate_datasets([seed_prompts, task_prompts()]).shuffle(seed=seed)
    prompts = prompts.select(range(min(recipe.num_prompts, len(prompts))))
    sft.save_to_disk(f"{recipe.data_dir}/sft")
    prompts.save_to_disk(f"{recipe.data_dir}/prompts")
    return sft, prompts


def load_data(recipe: RecipeArguments, seed: int) -> tuple[Dataset, Dataset]:
    """Local datasets when given, else the paper's data, prepared once by the main process (the other ranks wait,
    then read what it wrote)."""
    from accelerate import PartialState

    if recipe.sft_data_path and recipe.prompts_data_path:
        return load_from_disk(recipe.sft_data_path), load_from_disk(recipe.prompts_data_path)
    state = PartialState()
    with state.main_process_first():
        sft, prompts = prepare(recipe, seed) if state.is_main_process else (None, None)
    if not state.is_main_process:
        sft, prompts = load_from_disk(f"{recipe.data_dir}/sft"), load_from_disk(f"{recipe.data_dir}/prompts")
    if recipe.sft_data_path:
        sft = load_from_disk(recipe.sft_data_path)
    if recipe.prompts_data_path:
        prompts = load_from_disk(recipe.prompts_data_path)
    return sft, prompts


def device_map(args: CreamConfig, quantized: bool) -> dict[str, int] | str | None:
    """Where the model loads: a k-bit model goes whole onto this rank's GPU (one per process under `accelerate
    launch` / `torchrun`), or onto the CPU with `use_cpu` or without a GPU; an unquantized model is placed by the
    Trainer."""
    import torch
    from accelerate import PartialState

    if not quantized:
        return None
    if args.use_cpu or not torch.cuda.is_available():
        return "cpu"
    return {"": PartialState().local_process_index}


def main() -> None:
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

    from trl_cream import CreamTrainer

    parser = TrlParser((RecipeArguments, CreamConfig, ModelConfig))
    parser.set_defaults(**LLAMA3_DEFAULTS)
    recipe, args, model_args = parser.parse_args_and_config()
    sft, prompts = load_data(recipe, args.seed)
    state = PartialState()
    state.print(f"seed SFT: {len(sft)} conversations, prompts: {len(prompts)} ({args.num_iterations} rounds)")
    if recipe.prepare_only:
        return
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.chat_template is None:  # a base Llama-3 has none; use the Instruct model's format
        tokenizer.chat_template = AutoTokenizer.from_pretrained("meta-llama/Meta-Llama-3-8B-Instruct").chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # an existing token: no embedding resize
    quantization = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto",
        quantization_config=quantization,
        device_map=device_map(args, quantization is not None),
    )
    trainer = CreamTrainer(
        model=model,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        sft_dataset=sft,
        peft_config=get_peft_config(model_args),
    )
    output = trainer.train()
    for r in output.metrics["rounds"]:
        state.print(
            f"round {r['round']}: C={r['consistency']:.3f} tau={r['kendall_tau_mean']:.3f} pairs={r['num_pairs']}"
        )


if __name__ == "__main__":
    main()
