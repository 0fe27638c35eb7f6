"""Test-only launcher: run a script unchanged (``runpy``) under ``accelerate launch`` on CPU, with two patches that
only a CPU test machine needs. Used by tests/test_engines.py:

    accelerate launch --config_file cfg.yaml tests/engine_launch.py examples/cream_llama3.py --flag=value ...

- **FSDP on CPU.** accelerate 1.15 enables FSDP only for accelerator runs: on CPU an FSDP config silently becomes
  plain DDP (``MULTI_CPU``, the plugin dropped). The patch keeps the FSDP plugin and sets ``distributed_type`` to
  ``FSDP`` when the launch asked for it (``ACCELERATE_USE_FSDP=true``); FSDP2 (``fully_shard``) then runs on gloo.
  FSDP1 cannot run on CPU at all.
- **DeepSpeed's shared-memory all-reduce.** DeepSpeed's CPU accelerator JIT-compiles a C++ op
  (``deepspeed_shm_comm``, ~1-3 min with ninja on 2 cores, cached in ``~/.cache/torch_extensions``) the first time a
  process initialises its communication backend. It is only a faster all-reduce; without it DeepSpeed uses
  torch.distributed (gloo). The launcher marks it incompatible so CI does not spend minutes compiling.

It also records every `CreamTrainer` built and every DeepSpeed engine created (`TRAINERS`, `ENGINES`), which
tests/engine_plan.py writes out after each run (`engine_report`), so that a silent fallback to DDP cannot pass.
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs


ENGINES: list[dict] = []


def _patch_deepspeed() -> None:
    """Skip the shm op build, and record every engine `deepspeed.initialize` builds: its ZeRO stage, whether it
    trains (has an optimizer), and the numel of this rank's fp32 optimizer partition (half the model on 2 ranks)."""
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    original = deepspeed.initialize

    def initialize(*args, **kwargs):
        out = original(*args, **kwargs)
        engine = out[0]
        optimizer = getattr(engine, "optimizer", None)
        groups = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
        if groups is None:
            groups = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        ENGINES.append(
            {
                "zero_stage": int(engine.zero_optimization_stage()),
                "trains": kwargs.get("optimizer") is not None,
                "fp32_partition_numel": sum(int(g.numel()) for g in groups) if groups else None,
                "trainable_numel": sum(
                    int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad
                ),
            }
        )
        return out

    deepspeed.initialize = initialize


TRAINERS: list = []


def _record_trainers() -> None:
    from trl_cream import CreamTrainer

    original = CreamTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        TRAINERS.append(self)

    CreamTrainer.__init__ = init


def engine_report(trainer) -> dict:
    """What the trainer ran on: engine flags, ZeRO stage, and how much of each parameter this rank holds."""
    from trl_cream import distributed

    model = trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.accelerator.state
    local, full = 0, 0
    for param in model.parameters():
        full += int(getattr(param, "ds_numel", param.numel()))
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition
            local += int(param.ds_tensor.numel())
        elif hasattr(param, "to_local"):  # FSDP2 DTensor: this rank's shard
            local += int(param.to_local().numel())
        else:
            local += int(param.numel())
    plugin = getattr(state, "deepspeed_plugin", None)
    linear4bit = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    return {
        "num_linear4bit": len(linear4bit),
        "quant_type": linear4bit[0].weight.quant_type if linear4bit else None,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "ref_model_is_none": trainer.ref_model is None,
        "adapters": sorted(getattr(model, "peft_config", {})),
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        "local_param_numel": local,
        "full_param_numel": full,
        "deepspeed_engines": ENGINES,
        "lockstep": distributed.needs_lockstep(trainer.accelerator),
    }


def main() -> None:
    sys.modules.setdefault("engine_launch", sys.modules[__name__])  # one TRAINERS/ENGINES for the launched script
    AcceleratorState.__init__ = _keep_fsdp_on_cpu
    _patch_deepspeed()
    _record_trainers()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
