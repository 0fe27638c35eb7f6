"""Checks of `CreamConfig`'s plain values that `__post_init__` runs, so that a bad value fails when the config is
built (also from the CLI parser), before anything is loaded or written: the sampling settings as the candidates will
be sampled with them, and the optimizer, batch and epoch settings with which a round would crash or learn nothing."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py imports these checks
    from .config import CreamConfig


def _generation_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}


def check_sampling_settings(args: CreamConfig) -> None:
    """Temperature, top-p, top-k and `generation_kwargs` as the candidates will be sampled with them."""
    kwargs = dict(args.generation_kwargs or {})
    unknown = sorted(set(kwargs) - _generation_keys())
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, _generation_keys(), 1)) else
                 repr(k) for k in unknown]  # fmt: skip
        raise ValueError(
            f"generation_kwargs has key(s) {', '.join(hints)} that transformers' GenerationConfig does not know; "
            "they would be ignored silently. Fix or drop them (see transformers.GenerationConfig for the names)."
        )
    if kwargs.get("do_sample", True) is False:
        raise ValueError(
            "generation_kwargs={'do_sample': False}: CREAM ranks several *sampled* candidates per prompt; greedy "
            "decoding gives identical candidates, so every pair is tied and nothing is learnt. Drop do_sample from "
            "generation_kwargs (sampling is always on)."
        )
    where = lambda name: "generation_kwargs" if name in kwargs else name  # noqa: E731
    temperature = kwargs.get("temperature", args.temperature)
    if temperature is None or temperature <= 0:
        raise ValueError(
            f"{where('temperature')}: temperature={temperature} must be > 0 to sample candidates (the paper uses 0.8)."
        )
    top_p = kwargs.get("top_p", args.top_p)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(
            f"{where('top_p')}: top_p={top_p} must lie in (0, 1] (1.0 turns nucleus sampling off; the default is "
            "0.95)."
        )
    top_k = kwargs.get("top_k", args.top_k)
    if top_k is not None and top_k < 0:
        raise ValueError(f"{where('top_k')}: top_k={top_k} must be >= 0 (0 turns top-k filtering off).")


def check_output_and_lengths(args: CreamConfig) -> None:
    """``output_dir`` names a folder (not ``""``, not an existing file) and ``max_length`` is set."""
    from pathlib import Path

    if args.output_dir is not None and not str(args.output_dir).strip():
        raise ValueError(
            f"output_dir={args.output_dir!r}: give the folder the run is saved in (M<k>/, rounds/, cream_state/), "
            "e.g. output_dir='cream_run'."
        )
    if args.output_dir is not None and Path(args.output_dir).is_file():
        raise ValueError(
            f"output_dir={str(args.output_dir)!r} is an existing file, not a folder: the run saves M<k>/, rounds/ "
            "and cream_state/ in it. Choose a folder path."
        )
    if args.max_length is None:
        raise ValueError(
            "max_length=None: CREAM truncates prompts to max_length - max_new_tokens and scores prompt + candidate "
            "within max_length tokens, so it needs a number. Set max_length (the default is 1536)."
        )


def check_optimization_settings(args: CreamConfig) -> None:
    """Learning rate, batch sizes and epochs: values with which a round would crash or silently learn nothing."""
    if args.learning_rate <= 0:
        raise ValueError(
            f"learning_rate={args.learning_rate} must be > 0 (the paper uses 1e-6; a value <= 0 learns nothing or "
            "ascends the loss)."
        )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} must be at least 1.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(
            f"num_train_epochs={args.num_train_epochs}: every round would train on none of its pairs, so M<t+1> "
            "would equal M<t>. Use num_train_epochs > 0 (the paper: 1) or max_steps > 0."
        )
    if args.sft_learning_rate < 0 or args.sft_num_train_epochs < 0:
        raise ValueError(
            f"sft_learning_rate={args.sft_learning_rate} and sft_num_train_epochs={args.sft_num_train_epochs} must "
            "be >= 0."
        )


def check_vllm_settings(args: CreamConfig) -> None:
    """`generation_backend="vllm"`: vLLM importable, and TRL's vLLM settings that can work here."""
    if args.generation_backend != "vllm":
        return
    from ..modeling.vllm_backend import VLLM_EXTRA_HINT, VLLM_GENERATION_KWARGS, vllm_available

    if not vllm_available():
        raise ValueError(f"generation_backend='vllm' needs vLLM, which is not installed here: {VLLM_EXTRA_HINT}.")
    unknown = sorted(set(args.generation_kwargs or {}) - VLLM_GENERATION_KWARGS)
    if unknown:
        raise ValueError(
            f"generation_kwargs has key(s) {unknown} that generation_backend='vllm' does not pass on to vLLM (it "
            f"maps only {sorted(VLLM_GENERATION_KWARGS)}); drop them or use generation_backend='generate'."
        )
    if args.vllm_tensor_parallel_size != 1:
        raise ValueError(
            f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}: CREAM's vLLM backend runs one engine per "
            "training process, each sampling its own share of the round; tensor parallelism across processes is not "
            "supported. Set vllm_tensor_parallel_size=1 (a model too large for one GPU: use generation_backend="
            "'generate' under ZeRO-3/FSDP)."
        )
    if args.vllm_max_model_length is not None and args.vllm_max_model_length < args.max_length:
        raise ValueError(
            f"vllm_max_model_length={args.vllm_max_model_length} is below max_length={args.max_length}: prompts of "
            "up to max_length - max_new_tokens tokens plus their candidates must fit the engine. Raise it or leave it "
            "None (= max_length)."
        )
    if args.vllm_max_num_seqs < 1:
        raise ValueError(f"vllm_max_num_seqs={args.vllm_max_num_seqs} must be a positive integer.")


def check_logging_settings(args: CreamConfig) -> None:
    """The completions-table settings (`log_completions` and the two that only mean something with it)."""
    shown = args.num_completions_to_print
    if shown is not None and (isinstance(shown, bool) or not isinstance(shown, int) or shown < 0):
        raise ValueError(
            f"num_completions_to_print={shown!r}: give the number of rows to print (0 or more), or None for all."
        )
    if not args.log_completions:
        extra = [f"{name}={getattr(args, name)!r}" for name in ("num_completions_to_print", "log_unique_prompts")
                 if getattr(args, name) not in (None, False)]  # fmt: skip
        if extra:
            raise ValueError(
                f"{', '.join(extra)} only applies to the completions tables, which are off "
                "(log_completions=False). Set log_completions=True, or drop the setting."
            )


# The lowest transformers release the paged backend is tested with. At 5.16.1 (the floor vLLM's pins allow) its
# `ContinuousBatchingConfig` has no `page_size`, which `modeling/paged.py` sizes the cache with; 5.17-5.22 untested.
PAGED_MIN_TRANSFORMERS = "5.23"


def check_paged_transformers() -> None:
    """Refuse ``generation_backend="paged"`` on a transformers release whose continuous batching it cannot drive."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(PAGED_MIN_TRANSFORMERS):
        raise ValueError(
            f"generation_backend='paged' needs transformers>={PAGED_MIN_TRANSFORMERS} (its continuous batching "
            f"config with page_size); this environment has transformers {transformers.__version__} (e.g. the range "
            "vLLM pins). Use generation_backend='generate' or 'vllm', or upgrade transformers."
        )
