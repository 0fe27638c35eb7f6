"""The checks `CreamConfig.__post_init__` runs (`check_config`), so that a bad value fails when the config is built
(also from the CLI parser), before anything is loaded or written: the rounds, the choice fields (`CHOICES`), the
`OnlineDPOConfig` fields CREAM does not use, β, the sampling settings as the candidates will be sampled with them,
the vLLM engine's settings, and the optimizer, batch and epoch settings with which a round would crash or learn
nothing."""

from __future__ import annotations

import difflib
from dataclasses import MISSING
from typing import TYPE_CHECKING, Any

from ..core.consistency import GRANULARITIES, MEASURES
from ..core.rewards import ROUND1_BASELINES
from ..hub.utils import validate_settings
from ..modeling.sampling import BACKEND_NAMES, LONG_PROMPT_MODES
from .trl_base import OnlineDPOConfig

if TYPE_CHECKING:  # config.py imports these checks
    from .config import CreamConfig

REWARD_SOURCES: tuple[str, ...] = ("implicit", "reward_model", "judge")
BASELINE_SOURCES: tuple[str, ...] = ("previous", "reward_model")

REF_POLICIES: tuple[str, ...] = ("round_start", "initial")

# Every choice field and its allowed values, checked once, here (the owning layer defines each tuple).
CHOICES: dict[str, tuple[str, ...]] = {
    "consistency_measure": MEASURES,
    "consistency_granularity": GRANULARITIES,
    "ref_policy": REF_POLICIES,
    "generation_backend": BACKEND_NAMES,
    "long_prompts": LONG_PROMPT_MODES,
    "round1_baseline": ROUND1_BASELINES,
    "reward_source": REWARD_SOURCES,
    "baseline_source": BASELINE_SOURCES,
}

_VLLM = "CREAM's vLLM backend (`generation_backend='vllm'`) runs one engine colocated in each training process"
# Fields inherited from OnlineDPOConfig that CREAM does not use: setting one to anything but TRL's default is refused,
# with what to use instead.
IGNORED_PARENT_FIELDS: dict[str, str] = {
    "reward_model_path": (
        "CREAM ranks candidates with its own implicit reward; for an external reward model pass "
        "`reward_model=` to CreamTrainer with reward_source='reward_model' (or baseline_source='reward_model')"
    ),
    "reward_weights": "CREAM uses one reward source (`reward_source`), so there is nothing to weight",
    "missing_eos_penalty": (
        "CREAM's rewards are log-likelihood ratios, not reward-model scores to penalise; lower `max_new_tokens` "
        "or raise it so that candidates finish"
    ),
    "cache_implementation": "pass it in `generation_kwargs` (e.g. {'cache_implementation': 'static'})",
    "model_init_kwargs": "CreamTrainer takes an instantiated model: pass the kwargs to from_pretrained yourself",
    "vllm_model_impl": _VLLM,
    "vllm_structured_outputs_regex": _VLLM,
    "vllm_mode": _VLLM + ", so a vLLM server is not used: leave vllm_mode='colocate'",
    "vllm_server_base_url": _VLLM,
    "vllm_server_host": _VLLM,
    "vllm_server_port": _VLLM,
    "vllm_server_timeout": _VLLM,
    "vllm_group_port": _VLLM,
}
# TRL's vLLM settings that the vLLM backend uses (`check_vllm_settings`); with another backend they are refused too.
VLLM_PARENT_FIELDS: tuple[str, ...] = (
    "vllm_gpu_memory_utilization",
    "vllm_tensor_parallel_size",
    "vllm_enable_sleep_mode",
)


def _parent_default(name: str) -> Any:
    """TRL's default of an `OnlineDPOConfig` field."""
    spec = OnlineDPOConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def check_choices(config: CreamConfig) -> None:
    """Each choice field of `CHOICES` holds one of its allowed values."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ValueError(f"{name}={getattr(config, name)!r} is unknown; choose one of {', '.join(choices)}.")


def refuse_ignored_parent_fields(config: CreamConfig) -> None:
    """Refuse an `OnlineDPOConfig` field CREAM ignores (`IGNORED_PARENT_FIELDS`) when set to a non-default value."""
    ignored = dict(IGNORED_PARENT_FIELDS)
    if config.generation_backend != "vllm":
        ignored.update({name: "it is used only by generation_backend='vllm'" for name in VLLM_PARENT_FIELDS})
    for name, instead in ignored.items():
        if name in OnlineDPOConfig.__dataclass_fields__ and getattr(config, name) != _parent_default(name):
            raise ValueError(
                f"{name}={getattr(config, name)!r} is a field of TRL's OnlineDPOConfig that CREAM does not use, so it "
                f"would be silently ignored: {instead}. Leave {name} at its default "
                f"({_parent_default(name)!r})."
            )


def check_config(args: CreamConfig) -> None:
    """Every check of a `CreamConfig`'s own values, in order (`CreamConfig.__post_init__` runs it)."""
    if args.num_generations < 2:
        raise ValueError(
            f"num_generations={args.num_generations}: CREAM ranks candidates against each other, so it needs at "
            "least 2 per prompt (the paper uses 5)."
        )
    if args.num_iterations < 1:
        raise ValueError(f"num_iterations={args.num_iterations}: run at least one CREAM round.")
    check_choices(args)
    refuse_ignored_parent_fields(args)
    if args.generation_backend == "paged":
        check_paged_transformers()
    penalty = (args.generation_kwargs or {}).get("repetition_penalty", args.repetition_penalty)
    if args.generation_backend == "paged" and penalty not in (None, 1.0):
        raise ValueError(
            f"repetition_penalty={penalty} is not supported by generation_backend='paged' "
            "(transformers' continuous batching drops that logits processor); set repetition_penalty=1.0 or "
            "use generation_backend='generate'."
        )
    for name in ("generation_batch_size", "scoring_batch_size", "judge_max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} must be a positive integer.")
    if args.loss_type != "sigmoid":
        raise ValueError(f"loss_type={args.loss_type!r}: CREAM's loss is built on the sigmoid DPO loss only.")
    if args.use_vllm:
        raise ValueError(
            "use_vllm=True is TRL's switch, which CreamTrainer does not read: set generation_backend='vllm' "
            "(and leave use_vllm=False) to sample the candidates with vLLM."
        )
    check_beta(args)
    check_sampling_settings(args)
    check_vllm_settings(args)
    check_optimization_settings(args)
    check_output_and_lengths(args)
    check_logging_settings(args)
    validate_settings(args)


def check_beta(args: CreamConfig) -> None:
    """β: one positive number, or one per round."""
    betas = args.beta if isinstance(args.beta, (list, tuple)) else [args.beta]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise ValueError(f"beta={args.beta!r}: every β must be a number, e.g. beta=0.1 or beta=[0.1, 0.05].")
    if len(betas) not in (1, args.num_iterations):
        raise ValueError(
            f"beta={args.beta}: give one value, or one per round ({args.num_iterations} values for "
            f"num_iterations={args.num_iterations})."
        )
    if any(b <= 0 for b in betas):
        raise ValueError(f"beta={args.beta}: every β must be positive.")


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
