"""A 2-round CREAM run with `generation_backend="vllm"` on the tiny Llama, launched by tests/test_vllm_runs.py with
one process or under torchrun with two; it can SIGKILL itself in round 2 right after sampling (candidates drawn,
not saved) so that a resumed run must sample round 2 again from a fresh engine.

    python tests/vllm_child.py OUTPUT_DIR none|sampling [--resume] [--release]

Each rank appends the prompts it sampled, and whether its engine stayed up after sampling, to
``OUTPUT_DIR/sampled/rank<r>.jsonl``. ``--release``: `vllm_enable_sleep_mode=True` (on CPU the engine is shut down
after each sampling and started again next round).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import QUESTIONS, cream_args, perturbed, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_vllm import vllm_llama  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from trl_cream import CreamTrainer  # noqa: E402


class Recording(CreamTrainer):
    kill_at = "none"

    def generate_candidates(self, prompt_ids, desc="sampling", logps_out=None):
        out = super().generate_candidates(prompt_ids, desc, logps_out)
        record = Path(self.args.output_dir) / "sampled" / f"rank{self.accelerator.process_index}.jsonl"
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as f:
            resident = self.vllm_engine.sampler is not None
            f.write(json.dumps({"round": self.round, "prompt_ids": prompt_ids, "resident": resident}) + "\n")
        if self.kill_at == "sampling" and self.round == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def main(output_dir: Path, kill_at: str, resume: bool, release: bool) -> None:
    tokenizer = tiny_tokenizer()
    m0 = vllm_llama(tokenizer)
    start = output_dir.parent / f"{output_dir.name}_m1"
    if int(os.environ.get("RANK", "0")) == 0 and not start.exists():
        perturbed(m0, 0.3).save_pretrained(start)
    if "WORLD_SIZE" in os.environ:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    questions = QUESTIONS + [q.replace("?", " today?").replace(".", " now.") for q in QUESTIONS]
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    args = cream_args(
        output_dir, generation_backend="vllm", num_generations=4, max_new_tokens=12, learning_rate=5e-2,
        per_device_train_batch_size=2, vllm_enable_sleep_mode=release,
    )  # fmt: skip
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(start), ref_model=m0, args=args, train_dataset=prompts,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.kill_at = kill_at
    trainer.train(resume_from_checkpoint=True if resume else None)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], "--resume" in sys.argv, "--release" in sys.argv)
