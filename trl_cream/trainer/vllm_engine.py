"""The run's colocated vLLM engine (`generation_backend="vllm"`): built on the first round's sampling, kept across
rounds, made to hold π_t before each round's sampling, shut down when `train()` ends. With
`vllm_enable_sleep_mode=True` its memory is given back while the round scores and trains: on a GPU by vLLM's sleep
mode; on CPU, which has no sleep mode, by shutting the engine down after each sampling and starting it again (from
``M<k>``, a few seconds) for the next round's.

π_t of round t is ``M<k>`` (``k = iteration_index(t)``), which the run has saved before the round samples:

- full fine-tuning: the engine is built from that folder; in later rounds the policy's weights are pushed into it
  (every parameter under its Hugging Face name, tied ones such as ``lm_head.weight`` included);
- LoRA/QLoRA: the engine holds the base model and samples with a `LoRARequest` on the saved adapter ``M<k>``
  (no merge, no full-weight push). A 4-bit (QLoRA) base is loaded by vLLM as bitsandbytes-quantized.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..modeling import adapters
from ..modeling.sampling import SamplingSettings, TokenIds, pad_token_id
from ..modeling.vllm_backend import EngineSettings, VLLMSampler
from .phases import Policy

if TYPE_CHECKING:
    from .config import CreamConfig

logger = logging.getLogger(__name__)


def _dtype(model: nn.Module) -> torch.dtype:
    """The dtype the policy computes in (a 4-bit base's compute dtype, not its packed storage)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def policy_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The policy's parameters under their Hugging Face names, tied ones under each name (so that vLLM's separate
    ``lm_head`` is refreshed too), detached."""
    return [(name, param.detach()) for name, param in model.named_parameters(remove_duplicate=False)]


def engine_settings(policy: Policy, args: CreamConfig, iteration_dir: Path) -> EngineSettings:
    """What this process's engine is built with: π_t's folder ``iteration_dir`` (full fine-tuning) or the policy's
    base model and adapter rank (LoRA/QLoRA), sized by the run's ``vllm_*`` fields."""
    model = policy.model
    lora_rank, model_dir, quantization = None, iteration_dir, None
    if policy.use_peft:
        config = model.peft_config[adapters.policy_adapter_name(model)]
        lora_rank, model_dir = int(config.r), config.base_model_name_or_path or ""
        if not model_dir:
            raise ValueError(
                "generation_backend='vllm' with LoRA loads the base model into vLLM from its "
                "`base_model_name_or_path`, which this PEFT model does not have (a base built in memory). Load "
                "the base with from_pretrained(<folder or Hub id>) or use generation_backend='generate'."
            )
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model.get_base_model(), "is_loaded_in_4bit", False):
            quantization = "bitsandbytes"
    return EngineSettings(
        model_dir=model_dir,
        max_model_len=args.vllm_max_model_length or args.max_length,
        seed=args.seed + policy.accelerator.process_index,
        dtype=_dtype(model),
        max_num_seqs=args.vllm_max_num_seqs,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        lora_rank=lora_rank,
        quantization=quantization,
        enable_sleep_mode=args.vllm_enable_sleep_mode and torch.cuda.is_available(),
        enforce_eager=args.vllm_enforce_eager,
    )


class ColocatedEngine:
    """Holds this process's `VLLMSampler` and which ``M<k>`` it holds."""

    def __init__(self) -> None:
        self.sampler: VLLMSampler | None = None
        self.holds: Path | None = None
        self.policy_dir: Path | None = None  # π_t's saved folder ``M<k>``, set by the round's sampling phase
        self.timings: dict[str, float] = {}
        self.starts = 0  # engines built in this run (more than one when shut down between rounds on CPU)

    def _build(self, policy: Policy, args: CreamConfig, iteration_dir: Path) -> VLLMSampler:
        settings = engine_settings(policy, args, iteration_dir)
        started = time.perf_counter()
        sampler = VLLMSampler(settings)
        self.timings["engine_start_s"] = time.perf_counter() - started
        self.starts += 1
        logger.info("vLLM engine started from %s in %.1f s.", settings.model_dir, self.timings["engine_start_s"])
        return sampler

    def hold(self, policy: Policy, args: CreamConfig, iteration_dir: Path) -> VLLMSampler:
        """The engine, holding π_t = ``iteration_dir`` (built, or updated, when needed)."""
        iteration_dir = Path(iteration_dir)
        if self.sampler is None:
            self.sampler = self._build(policy, args, iteration_dir)
            if not policy.use_peft:
                self.holds = iteration_dir  # the engine loaded π_t's folder itself
        if self.holds != iteration_dir:
            started = time.perf_counter()
            if policy.use_peft:
                self.sampler.use_adapter(iteration_dir)
            else:
                self.sampler.load_weights(policy_weights(policy.model))
            self.timings["weight_sync_s"] = time.perf_counter() - started
            self.holds = iteration_dir
        return self.sampler

    def generate(
        self,
        policy: Policy,
        args: CreamConfig,
        settings: SamplingSettings,
        prompt_ids: list[TokenIds],
        logps_out: list[list[float]] | None = None,
    ) -> list[list[TokenIds]]:
        """This rank's candidates from π_t = ``policy_dir``, sampled by the engine with the run's ``settings`` (its
        seeds drawn from torch's generator, which `distributed.start_round` has seeded for this rank and round);
        ``args`` sizes the engine when it is built."""
        if self.policy_dir is None:
            raise RuntimeError("The vLLM engine was asked to sample before the round named π_t's folder M<k>.")
        sampler = self.hold(policy, args, self.policy_dir)
        show = policy.accelerator.is_local_main_process and not args.disable_tqdm
        candidates = sampler.generate(
            prompt_ids, settings, policy.eos_ids, pad_token_id(policy.tokenizer), logps_out, show_progress=show
        )
        if args.vllm_enable_sleep_mode and not sampler.sleeps:
            self.close()  # no sleep mode here (CPU): give the engine's memory and threads back until the next sampling
        return candidates

    def close(self) -> None:
        """Shut the engine down (idempotent); `CreamTrainer.train` calls it before returning."""
        if self.sampler is not None:
            self.sampler.close()
        self.sampler, self.holds = None, None
