"""Evaluation harness: downstream accuracy per iteration (paper Table 1) and ranking consistency (Table 2).

Accuracy is exact match under greedy decoding. Ranking consistency samples ``N`` candidates per prompt from the newer
checkpoint ``M_k`` and ranks them twice, with its implicit DPO reward ``r = log π_k - log π_0`` and with the older
checkpoint's ``r' = log π_{k-1} - log π_0``, then reports Kendall's τ, Spearman's ρ, TopOrder and ``C = (τ + 1) / 2``
as mean ± std over prompts. Sampling and scoring reuse `trl_cream.modeling.sampling` and `trl_cream.modeling.scoring`,
so the numbers here are computed exactly as the trainer computes its rewards.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import sampling
from ..modeling.movement import weight_change
from .answers import is_correct, predict
from .loglikelihood import evaluate_loglikelihood, resolve_modes
from .ranking import _as_messages, ranking_consistency
from .results import TaskResult

logger = logging.getLogger(__name__)

ModelOrPath = PreTrainedModel | torch.nn.Module | str | Path


@dataclass
class EvaluationResults:
    """Everything `run_evaluation` measured; `to_dict` is the content of ``results.json``.

    Attributes:
        iterations (`list[str]`): Checkpoint names in order, e.g. ``["M0", "M1", "M2", "M3"]``.
        accuracy (`dict[str, dict[str, TaskResult]]`): iteration -> task -> result (Table 1).
        consistency (`dict[str, dict]`): ``"M2 vs M1"`` -> `consistency_stats` output (Table 2).
        settings (`dict`): The evaluation settings, for the record.
    """

    iterations: list[str]
    accuracy: dict[str, dict[str, TaskResult]] = field(default_factory=dict)
    consistency: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResults:
        accuracy = {it: {t: TaskResult(**r) for t, r in tasks.items()} for it, tasks in data["accuracy"].items()}
        return cls(list(data["iterations"]), accuracy, dict(data["consistency"]), dict(data.get("settings", {})))


def greedy_generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding with the tokenizer's eos and pad tokens (the accuracy setting)."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=sampling.pad_token_id(tokenizer))
    return config


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Mapping[str, Sequence[Mapping[str, Any]]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "accuracy",
) -> dict[str, TaskResult]:
    """Exact-match accuracy of ``model`` on each eval set, with greedy decoding.

    Each row is ``{"task", "prompt", "answer", "kind": "mc" | "gsm8k", "num_choices"}``; the prompt (a plain user
    message) is wrapped as ``[{"role": "user", "content": prompt}]`` and goes through the chat template. Prompts are
    batched by length to limit padding; results keep the original row order.

    Args:
        model (`torch.nn.Module`): A causal LM (or `PeftModel`), already on its device.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        datasets (`Mapping[str, Dataset]`): Task name -> eval rows (a `datasets.Dataset` or a list of dicts).
        max_new_tokens (`int`, *optional*, defaults to `256`): Generation budget per answer.
        batch_size (`int`, *optional*, defaults to `8`): Prompts per `generate` call.
        show_progress (`bool`, *optional*, defaults to `True`): Show one progress bar per task.
        desc (`str`, *optional*, defaults to `"accuracy"`): Progress bar prefix.

    Returns:
        `dict[str, TaskResult]`: Task name -> accuracy, counts and per-row predictions.
    """
    config = greedy_generation_config(tokenizer, max_new_tokens)
    results: dict[str, TaskResult] = {}
    for task, dataset in datasets.items():
        rows = [dict(row) for row in dataset]
        prompt_ids = sampling.tokenize_prompts(tokenizer, [_as_messages(row["prompt"], tokenizer) for row in rows])
        order = sorted(range(len(rows)), key=lambda i: len(prompt_ids[i]))
        sorted_ids = [prompt_ids[i] for i in order]
        generated = sampling.generate_candidates(  # greedy, one completion per prompt
            model, tokenizer, sorted_ids, 1, config, batch_size, show_progress, desc=f"{desc} {task}"
        )
        completions = [""] * len(rows)
        for i, candidates in zip(order, generated, strict=True):
            completions[i] = tokenizer.decode(candidates[0], skip_special_tokens=True)
        predictions = [
            {
                "prompt": row["prompt"],
                "answer": row["answer"],
                "completion": completion,
                "prediction": predict(row, completion),
                "correct": is_correct(row, completion),
            }
            for row, completion in zip(rows, completions, strict=True)
        ]
        num_correct = sum(p["correct"] for p in predictions)
        accuracy = num_correct / len(rows) if rows else 0.0
        results[task] = TaskResult(task, accuracy, len(rows), num_correct, predictions)
    return results


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def load_checkpoint(
    path: str | Path,
    base: ModelOrPath | None = None,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs: Any,
) -> torch.nn.Module:
    """Load a saved checkpoint for evaluation: a full model folder, or a PEFT adapter folder on its base model.

    An adapter folder (one with ``adapter_config.json``) is loaded on ``base`` when given (a path, or a model that
    is deep-copied so that several adapters never share one wrapped base), else on the adapter's
    ``base_model_name_or_path``. The model is returned in eval mode, on ``device`` when given.

    Args:
        path (`str` or `Path`): The checkpoint folder.
        base (`str`, `Path` or model, *optional*): Base model for an adapter folder.
        device (`str` or `torch.device`, *optional*): Where to move the model.
        **from_pretrained_kwargs: Passed to `AutoModelForCausalLM.from_pretrained` (e.g. ``dtype``).
    """
    if not Path(path).is_dir() and _looks_like_hub_id(str(path)):  # e.g. M0 = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs)
        return (model.to(device) if device is not None else model).eval()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Checkpoint folder {str(path)!r} does not exist; pass a saved model or adapter folder, or a Hub id."
        )
    adapter_config = path / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        if base is None:
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{adapter_config} names no base_model_name_or_path; pass `base=` explicitly.")
        if isinstance(base, str | Path):
            base_model = AutoModelForCausalLM.from_pretrained(base, **from_pretrained_kwargs)
        else:
            base_model = copy.deepcopy(base)
        model = PeftModel.from_pretrained(base_model, path)
    elif (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    else:
        raise ValueError(f"{str(path)!r} holds neither config.json (full model) nor adapter_config.json (adapter).")
    if device is not None:
        model = model.to(device)
    return model.eval()


def run_evaluation(
    checkpoints: Mapping[str, ModelOrPath],
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    consistency_prompts: Sequence[Any] | None,
    output_dir: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    base: ModelOrPath | None = None,
    max_new_tokens: int = 256,
    num_generations: int = 4,
    generation_config: GenerationConfig | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    eval_mode: str | Mapping[str, str] = "generate",
    chat_template: bool = False,
    round1_baseline: str = "mean_logp",
) -> EvaluationResults:
    """Evaluate every iteration (Table 1) and every consecutive pair from ``M2 vs M1`` on (Table 2), then report.

    Checkpoints are visited in the mapping's order; the first one is π_0 for the implicit rewards. Each Table 2 pair
    also records ``weight_change``, how far the weights moved from the older checkpoint (`movement.weight_change`).
    Paths are loaded with `load_checkpoint` when needed and released when no longer needed, so at most three models
    (π_0, the previous and the current checkpoint) are in memory at once.

    Args:
        checkpoints (`Mapping[str, model or path]`): e.g. ``{"M0": base, "M1": "out/sft", "M2": "out/round1", ...}``.
        eval_sets (`Mapping[str, Dataset]`): Task name -> eval rows (see `evaluate_accuracy`).
        consistency_prompts (`Sequence` or `None`): Prompts for Table 2; `None` or empty skips it.
        output_dir (`str` or `Path` or `None`): Where `write_report` writes ``results.{json,md,png}``; `None` skips.
        tokenizer (`PreTrainedTokenizerBase`): Shared tokenizer.
        base (model or path, *optional*): Base model for adapter checkpoints (see `load_checkpoint`).
        max_new_tokens (`int`, *optional*, defaults to `256`): Greedy budget for accuracy.
        num_generations, generation_config, max_length, batch_size, seed: See `ranking_consistency`.
        device (`str` or `torch.device`, *optional*): Where loaded checkpoints go.
        show_progress (`bool`, *optional*, defaults to `True`): One progress bar for the whole evaluation (a step per
            checkpoint's accuracy and per Table 2 pair); each task's accuracy and time go to the log (INFO).
        eval_mode (`str` or `Mapping[str, str]`, *optional*, defaults to `"generate"`): ``"generate"`` (greedy
            answer + extraction, the paper's protocol) or ``"loglikelihood"`` (option scoring, see
            `trl_cream.evaluation.loglikelihood`), for every multiple-choice task, or a task -> mode mapping. Tasks
            without options (GSM8K) always generate.
        chat_template (`bool`, *optional*, defaults to `False`): Log-likelihood mode: put the question through the
            chat template instead of the plain ``"Question: ...\nAnswer:"`` context.
        round1_baseline (`str`, *optional*, defaults to `"mean_logp"`): Table 2's ``r'`` for the pair whose older
            checkpoint is π_0's successor M1 vs π_0 (see `rewards.baseline_rewards`).
    """
    names = list(checkpoints)
    if not names:
        raise ValueError("`checkpoints` is empty; pass e.g. {'M0': model_or_path, 'M1': ...}.")
    pair_kwargs = {"num_generations": num_generations, "generation_config": generation_config, "seed": seed}
    pair_kwargs.update(max_length=max_length, batch_size=batch_size, show_progress=False)  # one bar, below
    modes = resolve_modes(eval_sets, eval_mode)
    settings = _settings(pair_kwargs, eval_sets, modes, max_new_tokens, chat_template, consistency_prompts)
    pair_kwargs["round1_baseline"] = round1_baseline
    settings["initial_policy"] = names[0]  # π_0 of the implicit rewards: the report says which checkpoint it is
    results = EvaluationResults(iterations=names, settings=settings)
    loaded: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in loaded:
            spec = checkpoints[name]
            loaded[name] = load_checkpoint(spec, base, device) if isinstance(spec, str | Path) else spec
        return loaded[name]

    num_pairs = max(len(names) - 2, 0) if consistency_prompts else 0
    bar = tqdm(total=len(names) + num_pairs, desc="evaluation (Table 1, Table 2)", disable=not show_progress)
    for k, name in enumerate(names):
        bar.set_postfix_str(f"{name} accuracy")
        start = time.perf_counter()
        results.accuracy[name] = _accuracy(
            get(name), name, tokenizer, eval_sets, modes, max_new_tokens, batch_size, max_length, chat_template,
            False,
        )  # fmt: skip
        for task, result in results.accuracy[name].items():
            logger.info("%s %s: accuracy %.1f %% of %d (%s)", name, task, 100 * result.accuracy, result.n, result.mode)
        logger.info("%s: accuracy on %d tasks in %.1f s", name, len(eval_sets), time.perf_counter() - start)
        bar.update()
        if k >= 2 and consistency_prompts:
            label = f"{name} vs {names[k - 1]}"
            bar.set_postfix_str(label)
            start = time.perf_counter()
            old, initial = get(names[k - 1]), get(names[0])
            results.consistency[label] = ranking_consistency(
                get(name), old, initial, tokenizer, consistency_prompts, **pair_kwargs, desc=label
            )
            specs = [
                checkpoints[n] if isinstance(checkpoints[n], str | Path) else get(n) for n in (names[k - 1], name)
            ]
            results.consistency[label]["weight_change"] = weight_change(*specs)
            logger.info("Table 2, %s: done in %.1f s", label, time.perf_counter() - start)
            bar.update()
        for stale in [n for n in loaded if n not in (names[0], name)]:
            del loaded[stale]  # keep π_0 and the current checkpoint (the next one's predecessor)
        gc.collect()
    bar.close()
    if output_dir is not None:
        from .report import write_report

        write_report(results, output_dir)
    return results


def _settings(
    pair_kwargs: dict[str, Any],
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    modes: dict[str, str],
    max_new_tokens: int,
    chat_template: bool,
    consistency_prompts: Sequence[Any] | None,
) -> dict[str, Any]:
    """What an evaluation ran with, as stored in ``results.json``."""
    settings = {**pair_kwargs, "tasks": list(eval_sets), "max_new_tokens": max_new_tokens, "eval_modes": modes}
    settings.update(chat_template=chat_template, num_questions={t: len(rows) for t, rows in eval_sets.items()})
    settings.update(num_consistency_prompts=len(consistency_prompts or []))
    if pair_kwargs["generation_config"] is not None:
        settings["generation_config"] = pair_kwargs["generation_config"].to_dict()
    return settings


def _accuracy(
    model: torch.nn.Module,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    modes: dict[str, str],
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    chat_template: bool,
    show_progress: bool,
) -> dict[str, TaskResult]:
    """One checkpoint's Table 1 row: every task, by greedy generation or option log-likelihood (``modes``)."""
    generate = {t: rows for t, rows in eval_sets.items() if modes[t] == "generate"}
    scored = {t: rows for t, rows in eval_sets.items() if modes[t] == "loglikelihood"}
    per_task = evaluate_accuracy(
        model, tokenizer, generate, max_new_tokens, batch_size, show_progress, desc=f"{name} accuracy"
    )
    per_task.update(
        evaluate_loglikelihood(
            model, tokenizer, scored, batch_size, max_length, chat_template, show_progress, f"{name} options"
        )
    )
    return {task: per_task[task] for task in eval_sets}
