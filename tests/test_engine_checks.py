"""The engine helpers of trl_cream.engines that need no second process: the refusal of a silent fallback to DDP,
the ZeRO-3 sampling check, the engine release between rounds, and whole-weight comparison."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import perturbed, tiny_llama

from trl_cream import engines


def _accelerator(distributed_type=DistributedType.MULTI_CPU, deepspeed=None, fsdp=None, processes=2):
    state = SimpleNamespace(
        distributed_type=distributed_type, deepspeed_plugin=deepspeed, fsdp_plugin=fsdp, num_processes=processes
    )
    return SimpleNamespace(state=state)


NO_ENGINE_ARGS = SimpleNamespace(deepspeed=None, fsdp=None)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_a_launch_asking_for_an_engine_that_fell_back_to_ddp_is_refused(monkeypatch, variable):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    engines.check_engine_requested(_accelerator(), NO_ENGINE_ARGS)  # plain DDP, asked for nothing: fine
    monkeypatch.setenv(variable, "true")
    engine = "DeepSpeed" if "DEEPSPEED" in variable else "FSDP"
    with pytest.raises(RuntimeError, match=f"asked for {engine}.*silently dropped"):
        engines.check_engine_requested(_accelerator(), NO_ENGINE_ARGS)
    running = (
        _accelerator(DistributedType.DEEPSPEED, deepspeed=SimpleNamespace(zero_stage=2))
        if engine == "DeepSpeed"
        else _accelerator(DistributedType.FSDP, fsdp=SimpleNamespace(fsdp_version=2))
    )
    engines.check_engine_requested(running, NO_ENGINE_ARGS)  # the engine is really on
    if engine == "FSDP":  # a plugin kept on a state that accelerate treats as DDP (prepare would wrap in DDP)
        with pytest.raises(RuntimeError, match="asked for FSDP"):
            engines.check_engine_requested(_accelerator(fsdp=SimpleNamespace(fsdp_version=2)), NO_ENGINE_ARGS)


def test_training_arguments_asking_for_fsdp_on_a_ddp_state_are_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(RuntimeError, match="asked for FSDP"):
        engines.check_engine_requested(_accelerator(), SimpleNamespace(deepspeed=None, fsdp="full_shard"))
    with pytest.raises(RuntimeError, match="asked for DeepSpeed"):
        engines.check_engine_requested(_accelerator(), SimpleNamespace(deepspeed={"zero_optimization": {}}, fsdp=""))


def test_zero3_without_gathering_for_generation_is_refused():
    zero3 = _accelerator(DistributedType.DEEPSPEED, deepspeed=SimpleNamespace(zero_stage=3))
    engines.check_zero3_sampling(zero3, True)
    engines.check_zero3_sampling(
        _accelerator(DistributedType.DEEPSPEED, deepspeed=SimpleNamespace(zero_stage=2)), False
    )
    with pytest.raises(ValueError, match="ds3_gather_for_generation=False cannot run under DeepSpeed ZeRO-3"):
        engines.check_zero3_sampling(zero3, False)


def test_release_engine_frees_the_engine_and_says_whether_the_trainer_must_drop_it():
    freed = []
    accelerator = _accelerator(DistributedType.DEEPSPEED, deepspeed=SimpleNamespace(zero_stage=2))
    accelerator.free_memory = lambda: freed.append(True)
    assert engines.release_engine(accelerator) is True and freed  # DeepSpeed: point model_wrapped back, drop it
    # DDP keeps its wrapper (re-used by the next round's Trainer.train, as before)
    ddp = _accelerator()
    ddp.free_memory = lambda: freed.append(True)
    assert engines.release_engine(ddp) is False and len(freed) == 2


def test_same_weights_compares_whole_parameters(tokenizer):
    a = tiny_llama(tokenizer)
    b = tiny_llama(tokenizer)  # same seed: equal weights, distinct objects
    assert engines.same_weights(a, b)
    assert not engines.same_weights(a, perturbed(a, scale=1e-6))
    assert engines.initial_reference(a, use_peft=False) is None  # not ZeRO-3: the parent deep-copies M0 as before
    state = engines.full_state_dict(a, is_main_process=True)
    assert state.keys() == a.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    assert engines.full_state_dict(a, is_main_process=False) == {}
