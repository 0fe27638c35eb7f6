"""Bit-identity check for refactors: a 2-round full fine-tuning run and a 2-round LoRA run on the tiny test model,
printing a SHA-256 over every tensor of each run's saved M3 (and of M2, and of the round-2 candidates and scores).

Run it before and after a change that must not alter behaviour, on the same machine:
``PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/identity_check.py``; the printed hashes must match.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import QUESTIONS, cream_args, lora_m1, perturbed, tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_cream import CreamTrainer  # noqa: E402


def tensors_hash(folder: Path) -> str:
    """SHA-256 over every tensor of the safetensors files in ``folder``, by name (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        state = load_file(str(file))
        for name in sorted(state):
            tensor = state[name].contiguous()
            digest.update(f"{file.name}:{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def run(kind: str, root: Path) -> dict[str, str]:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    out = root / kind
    if kind == "full":
        trainer = CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=cream_args(out), train_dataset=prompts, processing_class=tokenizer
        )
    else:
        trainer = CreamTrainer(
            model=lora_m1(m0), args=cream_args(out), train_dataset=prompts, processing_class=tokenizer
        )
    output = trainer.train()
    return {
        "M2": tensors_hash(out / "M2"),
        "M3": tensors_hash(out / "M3"),
        "train_steps": str([r["train_steps"] for r in output.metrics["rounds"]]),
    }


def main() -> dict[str, dict[str, str]]:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        result = {kind: run(kind, Path(tmp)) for kind in ("full", "lora")}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
