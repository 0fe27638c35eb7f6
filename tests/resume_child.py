"""A 2-round CREAM run on the tiny test model that SIGKILLs itself at a chosen point of round 2.

Used by tests/test_resume.py in child processes (forked from a multiprocessing fork server that imported this
module once, so that a child costs no import time), or by hand:

    python tests/resume_child.py OUTPUT_DIR EVENTS_FILE KILL_AT [--resume] [--lora]

KILL_AT is one of: none, sampling (candidates drawn, not saved), scoring (scores computed, not saved), training
(after the 2nd optimizer step of round 2; intra-round checkpoints every step), saving (M3 written to its temporary
folder, not renamed), pushing (M3 saved, its push started but its push marker not written). Every sampling call,
scoring call, optimizer step and push is appended to EVENTS_FILE as a JSON line, so the test can tell which work a run
redid. `push_iteration` here stands in for the Hub push: it only writes the marker that the real one writes once an
iteration is on the Hub (`cream_state/pushed/M<k>.json`).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from conftest import QUESTIONS, cream_args, perturbed, tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from trl_cream import CreamTrainer  # noqa: E402

KILL_POINTS = ("none", "sampling", "scoring", "training", "saving", "pushing")


def run_config(output_dir: Path):
    return cream_args(output_dir, per_device_train_batch_size=1, save_strategy="steps", save_steps=1)


class KillingTrainer(CreamTrainer):
    """CreamTrainer that records its work and dies with SIGKILL at ``kill_at`` in round 2."""

    kill_at = "none"
    events: Path

    def _record(self, event: str, **fields) -> None:
        with open(self.events, "a") as handle:
            handle.write(json.dumps({"event": event, "round": self.round, **fields}) + "\n")

    def _die_if(self, point: str) -> None:
        if self.kill_at == point and self.round == 2:
            self._record("killed", point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    def generate_candidates(self, prompt_ids, desc="sampling"):
        out = super().generate_candidates(prompt_ids, desc)
        self._record("sampled")
        self._die_if("sampling")
        return out

    def score_round(self, t, prompt_ids, candidates):
        out = super().score_round(t, prompt_ids, candidates)
        self._record("scored")
        self._die_if("scoring")
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.round == 2 and self.state.global_step == 2:
            self._die_if("training")
        self._record("step", step=self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)

    def _pushes_to_hub(self) -> bool:
        return True

    def push_iteration(self, index: int) -> None:
        self._record("pushed", index=index)
        if index == 3:
            self._die_if("pushing")
        marker = Path(self.args.output_dir) / "cream_state" / "pushed" / f"M{index}.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"index": index}))

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if output_dir is not None and Path(output_dir).name.startswith(".M3"):  # M3's files written, not yet renamed
            self._die_if("saving")


def build(output_dir: Path, events: Path, kill_at: str = "none", lora: bool = False) -> KillingTrainer:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    if lora:
        model = get_peft_model(m0, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=generator))
        ref = None
    else:
        model, ref = perturbed(m0), m0
    trainer = KillingTrainer(
        model=model, ref_model=ref, args=run_config(output_dir), train_dataset=prompts, processing_class=tokenizer
    )
    trainer.kill_at, trainer.events = kill_at, events
    return trainer


def main(output_dir: Path, events: Path, kill_at: str, resume: bool | str = False, lora: bool = False) -> None:
    assert kill_at in KILL_POINTS, kill_at
    trainer = build(Path(output_dir), Path(events), kill_at, lora=lora)
    gc.freeze()  # the trainer's gc.collect() calls then skip the ~1M long-lived objects of the imports: ~1 s each
    trainer.train(resume_from_checkpoint=resume or None)  # True, or an intra-round checkpoint folder
    trainer._record("finished")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], resume="--resume" in sys.argv, lora="--lora" in sys.argv)
