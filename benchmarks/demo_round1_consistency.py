"""Round-1 consistency C of the offline demo as a function of its SFT learning rate.

Runs the demo's SFT stage and its first CREAM round only (same data, model, seed and settings as `make demo`,
`--size small`), for each SFT learning rate given, and prints one JSON line per rate with C, τ and what explains
them: in round 1, ``r = log π1 − log π0`` is compared with ``r' = log π0 / |y|``. When SFT moved π1 far, log π1
barely varies across π1's own samples, so ``r ≈ const − log π0`` and τ goes toward −1 (C toward 0); when SFT
moved it a little, r is small noise and τ is near 0 (C near 0.5). See docs/faq.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/demo_round1_consistency.py --lrs 3e-4 3e-5

Sampling and scoring a round of SmolLM2-135M on CPU take a few minutes per rate. Measure C here, not time.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from typing import Any

import torch
from datasets import load_from_disk

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.recipes import assets, demo_data
from trl_cream.recipes.demo import DEMO_DEFAULTS

ANSWER = re.compile(r"The answer is [A-H]\b")


class FirstRoundOnly(CreamTrainer):
    """The demo's trainer, stopped after round 1 (the prompts of round 1 are exactly the demo's)."""

    def split_prompts(self) -> list[list[Any]]:
        return super().split_prompts()[:1]


def _within_prompt_std(values: torch.Tensor) -> float:
    return values.std(dim=1).mean().item()


def measure(sft_learning_rate: float, size: str, seed: int) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = str(assets.smollm2_model_dir())
    data = demo_data.build_demo_datasets(size, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        defaults = {**DEMO_DEFAULTS, "output_dir": out, "sft_learning_rate": sft_learning_rate, "seed": seed}
        args = CreamConfig(**defaults, use_cpu=True, disable_tqdm=True)
        trainer = FirstRoundOnly(
            model=model,
            args=args,
            train_dataset=data.prompts,
            processing_class=tokenizer,
            sft_dataset=data.sft,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        output = trainer.train()
        metrics = output.metrics["rounds"][0]
        candidates = load_from_disk(f"{out}/rounds/round_1/candidates")
    completions = candidates["completion"]
    shape = (-1, args.num_generations)
    lengths = torch.tensor(candidates["num_tokens"], dtype=torch.float64).clamp_min(1).view(shape)
    policy = torch.tensor(candidates["logp_policy"], dtype=torch.float64).view(shape)
    initial = torch.tensor(candidates["logp_initial"], dtype=torch.float64).view(shape)
    return {
        "sft_learning_rate": sft_learning_rate,
        "sft_loss": round(output.metrics["sft"]["sft_loss"], 4),
        "consistency": round(metrics["consistency"], 3),
        "kendall_tau_mean": round(metrics["kendall_tau_mean"], 3),
        "frac_tau_negative": round(metrics["frac_tau_negative"], 3),
        "num_prompts": metrics["num_prompts"],
        "num_pairs": metrics["num_pairs"],
        # the mechanism: spread across a prompt's candidates of the per-token log-likelihood under π1 and π0
        "std_logp_pi1_per_token": round(_within_prompt_std(policy / lengths), 3),
        "std_logp_pi0_per_token": round(_within_prompt_std(initial / lengths), 3),
        "frac_answer_format": round(sum(bool(ANSWER.search(c)) for c in completions) / len(completions), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 3e-5], help="SFT learning rates to compare.")
    parser.add_argument("--size", default="small", help="Demo data size preset (the demo's default: small).")
    parser.add_argument("--seed", type=int, default=42)
    cli = parser.parse_args()
    for lr in cli.lrs:
        print(json.dumps(measure(lr, cli.size, cli.seed)), flush=True)


if __name__ == "__main__":
    main()
