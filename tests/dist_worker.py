"""A tiny 2-round CREAM run, launched by tests/test_distributed.py with 1 process or under torchrun with several.

Candidates are injected through `CreamTrainer.generate_candidates` (derived from the prompt token ids only), so the
run does not depend on any sampling RNG and a 1-process and a 2-process run see the same round. Each rank writes the
prompts it was asked to sample to ``<output_dir>/sampled/rank<r>.jsonl``.

    python tests/dist_worker.py OUTPUT_DIR full,lora PER_DEVICE_BATCH    # one run per mode, in OUTPUT_DIR/<mode>
    python tests/dist_worker.py OUTPUT_DIR full PER_DEVICE_BATCH resume   # resume the run in OUTPUT_DIR/full

Modes: ``full`` (M1, π_0 built in memory), ``full_loaded`` (the same weights, saved and loaded back with
``from_pretrained`` after the config, so that ZeRO-3 partitions them at load), ``lora``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import QUESTIONS, cream_args, perturbed, tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from trl_cream import CreamTrainer  # noqa: E402

NUM_PROMPTS = 16  # 8 a round: 8 pairs, 2 optimizer steps of 4 pairs


def injected(prompt: list[int], n: int, vocab: int, low: int) -> list[list[int]]:
    """``n`` distinct candidates that depend only on the prompt's token ids."""
    h = sum((k + 1) * tok for k, tok in enumerate(prompt))
    return [[low + (h * 7 + i * 13 + k * 5) % (vocab - low) for k in range(2 + (h + i) % 5)] for i in range(n)]


class InjectedCandidates(CreamTrainer):
    def generate_candidates(self, prompt_ids: list[list[int]], desc: str = "sampling") -> list[list[list[int]]]:
        record = Path(self.args.output_dir) / "sampled" / f"rank{self.accelerator.process_index}.jsonl"
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as f:
            for ids in prompt_ids:
                f.write(json.dumps({"round": self.round, "prompt_ids": ids, "n": self.args.num_generations}) + "\n")
        low = max(self._tokenizer.all_special_ids) + 1
        return [injected(ids, self.args.num_generations, len(self._tokenizer), low) for ids in prompt_ids]


def _saved_and_loaded(model, path: Path, args):
    """``model`` written by the main process and loaded back by every rank with ``from_pretrained``."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(path)
    state.wait_for_everyone()
    return AutoModelForCausalLM.from_pretrained(path)


def _record_identical_refused(initial, output_dir: Path, args, prompts, tokenizer) -> None:
    """Build the trainer with M1 = a second load of π_0 (equal weights, partitioned alike under ZeRO-3) and record in
    ``identical_refused.json`` whether the identity check refused it, as it must."""
    from transformers import AutoModelForCausalLM

    same = AutoModelForCausalLM.from_pretrained(output_dir / "init" / "m0")
    try:
        InjectedCandidates(model=same, ref_model=initial, args=args, train_dataset=prompts, processing_class=tokenizer)
        refused = False
    except ValueError as error:
        refused = "identical to the initial model" in str(error)
    if int(os.environ.get("RANK", "0")) == 0:
        (output_dir / "identical_refused.json").write_text(json.dumps({"refused": refused}))


def run(output_dir: Path, mode: str, batch: int, resume: bool = False) -> None:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    questions = QUESTIONS + [q.replace("?", " today?").replace(".", " now.") for q in QUESTIONS]
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions[:NUM_PROMPTS]]})
    args = cream_args(output_dir, per_device_train_batch_size=batch, num_generations=4, learning_rate=1e-2)
    if mode == "full":
        trainer = InjectedCandidates(
            model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
        )
    elif mode == "full_loaded":  # M1 and π_0 loaded after the config: under ZeRO-3 (zero3_init_flag) partitioned
        initial = _saved_and_loaded(m0, output_dir / "init" / "m0", args)
        _record_identical_refused(initial, output_dir, args, prompts, tokenizer)
        trainer = InjectedCandidates(
            model=_saved_and_loaded(perturbed(m0), output_dir / "init" / "m1", args),
            ref_model=initial,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )
    else:
        model = get_peft_model(m0, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        perturbed_adapter = dict(perturbed(model, scale=0.2, seed=3).named_parameters())
        for name, param in model.named_parameters():
            if "lora_B" in name:  # M1 = a non-identity adapter, as after an SFT stage
                param.data.copy_(perturbed_adapter[name].data)
        trainer = InjectedCandidates(model=model, args=args, train_dataset=prompts, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume or None)
    if trainer.accelerator.is_main_process:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        (output_dir / "world.json").write_text(json.dumps({"world": world, "batch": batch}))


def main() -> None:
    output_dir, modes, batch = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    resume = sys.argv[4:] == ["resume"]
    for mode in modes:
        run(output_dir / mode, mode, batch, resume)


if __name__ == "__main__":
    main()
