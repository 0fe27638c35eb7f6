"""examples/cream_llama3.py, unchanged, run end to end under torchrun with 2 CPU processes (gloo): SFT stage M0 → M1
and 2 CREAM rounds, with command-line overrides that substitute a tiny local Llama and tiny local datasets.

The recipe's default is QLoRA (NF4); this run turns quantization off (`--load_in_4bit false`, the tiny hidden size
32 is below bitsandbytes' quantization block) and keeps the LoRA adapters on. The NF4 default runs in
tests/test_engines.py (hidden size 64, 1 process and DDP), the DeepSpeed and FSDP2 engines there too; the GPU path
(device_map per local rank, `prepare_model_for_kbit_training`) only runs on a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import QUESTIONS, RECIPE_TINY_OVERRIDES, tiny_llama, tiny_tokenizer
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "cream_llama3.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama3_recipe_runs_end_to_end_on_two_processes(tmp_path):
    tokenizer = tiny_tokenizer()
    model_dir, sft_dir, prompts_dir, out = (tmp_path / name for name in ("model", "sft", "prompts", "out"))
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    answers = ["Seven.", "A cat.", "From clouds.", "Water and light.", "30.", "Hello!", "42.", "Maths."]
    messages = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(QUESTIONS, answers, strict=True)
    ]
    Dataset.from_dict({"messages": messages}).save_to_disk(str(sft_dir))
    Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]}).save_to_disk(str(prompts_dir))

    overrides = {
        "model_name_or_path": model_dir,
        "sft_data_path": sft_dir,
        "prompts_data_path": prompts_dir,
        "output_dir": out,
        "load_in_4bit": "false",  # NF4 QLoRA is the default (tests/test_engines.py); see the module docstring
        **RECIPE_TINY_OVERRIDES,
    }
    argv = [f"--{k}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(_free_port()), str(SCRIPT), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("round 1: C=") == 1  # printed once, by the main process

    for m in ("M1", "M2", "M3"):
        assert (out / m / "adapter_config.json").is_file() and (out / m / "tokenizer_config.json").is_file(), m
    m1, m3 = (load_file(str(out / m / "adapter_model.safetensors")) for m in ("M1", "M3"))
    assert any(v.abs().sum() > 0 for k, v in m1.items() if "lora_B" in k)  # the SFT stage moved the adapter
    for t in (1, 2):
        metrics = json.loads((out / "rounds" / f"round_{t}" / "metrics.json").read_text())
        # the 8 prompts split 4 a round; both ranks' candidates are in the round (N = 5, the recipe's default)
        assert metrics["num_prompts"] == 4 and metrics["num_candidates"] == 4 * 5
        assert len(load_from_disk(str(out / "rounds" / f"round_{t}" / "candidates"))) == 20
    assert any(not (m1[k] == m3[k]).all() for k in m1)  # the rounds trained the policy adapter
