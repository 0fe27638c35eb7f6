"""DeepSpeed and FSDP around a CREAM round (the distributed layer, beside `trl_cream.distributed`).

A CREAM run trains many times on one model: once per round (and once more in the SFT stage), each with a fresh
AdamW. Under DeepSpeed the optimizer lives in the engine, so **each round builds a fresh engine and destroys it when
the round's training ends** (`release_engine`): its fp32 master weights and Adam moments (ZeRO-3: also its
parameter-fetch hooks) are freed before the next round samples and scores, when memory is needed for the KV cache
and the frozen scoring models. Keeping one engine across rounds would keep that optimizer state alive through
sampling and scoring for nothing, since the next round starts from a fresh AdamW anyway.

Between engines (before round 1, and from one round's save to the next round's training) the policy is the bare
model. Under ZeRO-3 its weights stay partitioned across ranks (``zero.Init`` at load, or the last engine's
partitioning), so whatever reads them outside an engine gathers them: sampling (TRL's ``ds3_gather_for_generation``),
π_t scoring (`scoring_policy`), the identity check (`full_parameters`) and the save (`distributed.save_full_model`).
π_0 under ZeRO-3 is built partitioned from M0 (`initial_reference`), never deep-copied.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch import nn

logger = logging.getLogger(__name__)


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the accelerator runs DeepSpeed (any ZeRO stage)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def is_zero3(accelerator: Any) -> bool:
    """Whether the accelerator runs DeepSpeed ZeRO stage 3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@runtime_checkable
class LaunchArgs(Protocol):
    """The engine fields of the training arguments (`transformers.TrainingArguments`, hence `CreamConfig`)."""

    deepspeed: dict | str | None
    fsdp: str | None


def check_engine_requested(accelerator: Any, args: LaunchArgs) -> None:
    """Refuse a run whose launch asked for DeepSpeed or FSDP but whose accelerator fell back to plain DDP (or one
    process): the user would believe the model is sharded. accelerate does this silently, e.g. for an FSDP config on
    CPU, or a DeepSpeed config whose training arguments lack ``use_cpu`` on a CPU machine."""
    state = accelerator.state
    asked = []
    if _flag("ACCELERATE_USE_DEEPSPEED") or args.deepspeed:
        asked.append(("DeepSpeed", state.distributed_type == DistributedType.DEEPSPEED))
    if _flag("ACCELERATE_USE_FSDP") or args.fsdp:
        fsdp = getattr(state, "fsdp_plugin", None) is not None and state.distributed_type == DistributedType.FSDP
        asked.append(("FSDP", fsdp))
    for engine, running in asked:
        if not running:
            raise RuntimeError(
                f"The launch asked for {engine} (accelerate config or training arguments), but the accelerator runs "
                f"{state.distributed_type} with {state.num_processes} process(es): {engine} was silently dropped, and "
                "every rank would hold and train the whole model. On a GPU machine, check that the launch sees the "
                "GPUs. On CPU: DeepSpeed needs `use_cpu: true` in the accelerate config and `use_cpu=True` (--use_cpu "
                "true) in the training arguments; accelerate turns FSDP into DDP on CPU (see docs/scaling.md). To run "
                "plain DDP on purpose, launch with examples/accelerate_configs/multi_gpu.yaml."
            )


def check_zero3_sampling(accelerator: Any, ds3_gather_for_generation: bool) -> None:
    """Refuse ZeRO-3 with ``ds3_gather_for_generation=False``: CREAM samples between engines (see the module
    docstring), where no ZeRO-3 hook fetches a layer's shards during the forward, so each rank must gather the
    weights to sample."""
    if is_zero3(accelerator) and not ds3_gather_for_generation:
        raise ValueError(
            "ds3_gather_for_generation=False cannot run under DeepSpeed ZeRO-3 in CREAM: candidates are sampled "
            "outside the training engine (each round's engine is released after its training), where no ZeRO-3 hook "
            "fetches the weight shards. Keep ds3_gather_for_generation=True (the default): each rank gathers the "
            "whole model in its training dtype while it samples and scores π_t."
        )


def release_engine(accelerator: Any) -> bool:
    """End of a round's training: free the accelerator's references (under DeepSpeed this destroys the round's engine:
    optimizer state, ZeRO-3 hooks). Returns whether the Trainer must now point ``model_wrapped`` back at the bare
    model and drop its ``deepspeed`` engine (DeepSpeed), so that the next ``Trainer.train`` builds a fresh engine (a
    stale ``model_wrapped`` would make it skip `accelerator.prepare`, and backward would find no engine)."""
    accelerator.free_memory()
    return is_deepspeed(accelerator)


@contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """``deepspeed.zero.GatheredParameters`` for the ZeRO-3-partitioned ones among ``params`` (a no-op when none is:
    DeepSpeed is then not even imported). A collective: every rank must enter it with the same parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@contextmanager
def scoring_policy(accelerator: Any, model: nn.Module, wrapped: nn.Module, is_fsdp: bool) -> Iterator[nn.Module]:
    """The policy π_t as scoring must call it (``model`` unwrapped, ``wrapped`` as the Trainer holds it). FSDP: the
    wrapped module (its forwards unshard). ZeRO-3: scoring runs between engines (the round's engine is released after
    training), so the bare model's weights are gathered for the duration, as sampling gathers them with
    ``ds3_gather_for_generation``; without this the forwards would see the empty local shards of ``zero.Init``.
    Otherwise the bare model."""
    if is_fsdp:
        yield wrapped
    elif is_zero3(accelerator):
        with gathered(list(model.parameters())):
            yield model
    else:
        yield model


def full_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` for every parameter of ``module`` (a DeepSpeed engine or DDP wrapper is unwrapped),
    one at a time on CPU, whatever holds it: ZeRO-3-partitioned parameters are gathered, FSDP2 ``DTensor`` shards
    made full. Collectives: every rank must iterate the same module in the same order."""
    module = extract_model_from_parallel(module)
    for name, param in module.named_parameters():
        with gathered([param]):
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor
                tensor = tensor.full_tensor()
            tensor = tensor.to("cpu", copy=True)
        yield name, tensor  # outside the gather: a caller that stops early leaves no collective half-done


def full_state_dict(model: nn.Module, is_main_process: bool) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model (FSDP2 ``DTensor`` or ZeRO-3 parameters, in an engine or not), built
    one gathered parameter at a time on CPU: on the main process; empty elsewhere (all ranks must call it: each
    gather is a collective, and the other ranks drop each tensor at once). Non-persistent buffers (e.g. rotary
    ``inv_freq``) are left out, as in ``state_dict()``. Used instead of FSDP2's
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, which on CPU returns tensors whose storage the
    reshard after the gather has already freed ("invalid python storage" when safetensors writes them)."""
    keys = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in full_parameters(model):
        if name in keys and is_main_process:
            state[name] = tensor
    if is_main_process:
        for name, buffer in model.named_buffers():
            if name in keys:
                state[name] = buffer.detach().to("cpu", copy=True)
    return state


def same_weights(model: nn.Module, other: nn.Module) -> bool:
    """Whether two models hold exactly the same parameters (names, shapes, values), compared whole even when they are
    ZeRO-3-partitioned or FSDP-sharded (every rank must call it; all reach the same answer)."""
    mine, theirs = full_parameters(model), full_parameters(other)
    for (name, a), (other_name, b) in zip(mine, theirs):
        if name != other_name or a.shape != b.shape or not torch.equal(a, b):
            return False
    return next(mine, None) is None and next(theirs, None) is None


def initial_reference(model: nn.Module, use_peft: bool) -> nn.Module | None:
    """π_0 for a full fine-tuning run with an SFT stage under ZeRO-3 (``zero3_init_flag``): a frozen copy of M0,
    built from its config under ``zero.Init`` (so partitioned like the policy) and filled one gathered parameter at a
    time. TRL's ``create_reference_model`` refuses ZeRO-3 (it deep-copies, which partitioned weights forbid); TRL's
    advice is to load the reference separately, which this does from memory. `None` everywhere else (the parent then
    deep-copies M0 as usual, or uses the adapter-free base with PEFT). The parent prepares the copy like every TRL
    reference model (`trl.models.utils.prepare_deepspeed`: a ZeRO-3 inference engine)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if use_peft or not is_deepspeed_zero3_enabled():
        return None
    dtype = next(model.parameters()).dtype
    reference = type(model)._from_config(model.config, dtype=dtype)  # zero.Init: partitioned from the start
    reference.generation_config = model.generation_config
    sources = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        source = sources[name]
        with gathered([param, source], modifier_rank=0), torch.no_grad():
            param.data.copy_(source.data)  # rank 0's copy is partitioned to every rank on exit
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    reference.requires_grad_(False)
    return reference.eval()
