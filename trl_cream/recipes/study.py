"""`trl-cream study`: SRLM vs CREAM from one shared M1, over seeds, measured honestly (paper Tables 1 and 2).

One SFT stage turns M0 into M1 (a LoRA adapter), once. From that same M1, every method (SRLM: plain self-rewarding
iterative DPO, ``consistency_measure="none"``; CREAM: ``"kendall"``) runs its rounds M1 → M2 → M3 for every seed;
the seed changes the prompt order across rounds and the sampling. Every checkpoint is then evaluated on the same
questions (log-likelihood multiple choice by default), and every consecutive pair is compared for ranking
consistency on the same held-out prompts (never trained on). The report gives mean ± std over seeds next to the
binomial standard error of each accuracy, and says whether CREAM beats SRLM relative to the seed spread.
The round-1 baseline (``round1_baseline`` "mean_logp" vs "sum_logp") is measured on every run's round-1 candidates.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..trainer.config import CreamConfig
from .demo import DEMO_DEFAULTS
from .study_report import summarise, write_study_report

METHODS: dict[str, str] = {"srlm": "none", "cream": "kendall"}  # method -> consistency_measure

# Sizes of the study. `default` is the CPU run; `tiny` is the CI smoke size (use it with a tiny --model); `large`
# is for a GPU. `prompts` are the training prompts of one run over all its rounds; `eval_mc` the questions per
# multiple-choice task; `consistency_prompts` the held-out prompts of Table 2 (the same for every run).
# The measured cost of each size is in benchmarks/RESULTS.md.
STUDY_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(sft_mc=8, sft_chat=0, prompts=4, eval_mc=6, consistency_prompts=2, num_generations=2),
    "default": dict(sft_mc=72, sft_chat=8, prompts=16, eval_mc=200, consistency_prompts=8, num_generations=4),
    "large": dict(sft_mc=1024, sft_chat=64, prompts=1024, eval_mc=500, consistency_prompts=64, num_generations=5),
}
# CreamConfig values of the study that differ from the library's defaults: the demo's (a 135M model, a few pairs a
# round, LoRA), with its own output folder.
# 3 epochs of the study's 2 steps (8 prompts per round, batch 4): the sweep's measured 6 steps per round at lr 1e-3.
STUDY_DEFAULTS: dict[str, Any] = {
    **DEMO_DEFAULTS, "output_dir": "cream_study", "num_iterations": 2, "num_train_epochs": 3.0,
}  # fmt: skip


def study_defaults(size: str) -> dict[str, Any]:
    """`STUDY_DEFAULTS` with the size's number of candidates per prompt ``N`` (a command-line flag overrides it)."""
    if size not in STUDY_SIZES:
        raise ValueError(f"Unknown study size {size!r}; choose among {sorted(STUDY_SIZES)}.")
    return {**STUDY_DEFAULTS, "num_generations": STUDY_SIZES[size]["num_generations"]}


@dataclass
class StudyArguments:
    """Arguments of `trl-cream study`; training settings are the CreamConfig fields (`--learning_rate` ...)."""

    size: str = field(
        default="default",
        metadata={
            "help": "tiny (CI smoke test, with a tiny --model), default (~30 min on 2 CPU cores with SmolLM2-135M, "
            "200 questions per task) or large (a GPU: 1024 prompts, 500 questions per task, N=5).",
            "choices": list(STUDY_SIZES),
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "M0: a local folder or Hub id. Default: the offline SmolLM2-135M-Instruct."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the runs."})
    methods: list[str] = field(
        default_factory=lambda: ["srlm", "cream"], metadata={"help": "Methods to compare: srlm and/or cream."}
    )
    tasks: list[str] = field(
        default_factory=lambda: ["arc_easy", "siqa"],
        metadata={
            "help": "Multiple-choice tasks among arc_easy, arc_challenge, openbookqa, siqa. Default: the two where "
            "SmolLM2-135M is clearly above chance by option log-likelihood (ARC-Challenge is at chance, OpenBookQA "
            "below it in acc); each task adds ~1/3 to the evaluation time."
        },
    )
    eval_mode: str = field(
        default="loglikelihood",
        metadata={"help": "Scoring of the tasks.", "choices": ["generate", "loglikelihood"]},
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Questions per forward during evaluation."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Greedy budget in generate mode."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of M1 and of the rounds."})


def _run_args(args: CreamConfig, output_dir: Path, seed: int, measure: str) -> CreamConfig:
    run = copy.deepcopy(args)
    run.output_dir, run.seed, run.consistency_measure = str(output_dir), seed, measure
    return run


def _round1_baselines(round_dir: Path, num_generations: int) -> dict[str, dict[str, float]]:
    """τ and C of round 1's ranking against π_0's mean and summed log-likelihood, from its saved candidates."""
    from datasets import load_from_disk

    from ..core.consistency import round_statistics
    from ..core.rewards import ROUND1_BASELINES, baseline_rewards

    table = load_from_disk(str(round_dir / "candidates"))
    reward, initial, lengths = (
        torch.tensor(table[column]).view(-1, num_generations) for column in ("reward", "logp_initial", "num_tokens")
    )
    out = {}
    for kind in ROUND1_BASELINES:
        stats = round_statistics(reward, baseline_rewards(None, initial, lengths, kind))
        mean = stats["kendall_tau"]["mean"]
        mean = math.nan if mean is None else mean
        out[kind] = {"kendall_tau": mean, "consistency": (mean + 1) / 2, "num_defined": stats["num_defined"]}
    return out


def run_study(study: StudyArguments, args: CreamConfig) -> dict[str, Any]:
    """Run SFT once, every (method, seed) run, the evaluation, and write ``<output_dir>/results.{md,json,png}``."""
    _check_study(study, args)
    sizes = STUDY_SIZES[study.size]
    out, timings = Path(args.output_dir), {}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = _study_setup(study, args, sizes)
    print(
        f"[study] M0 = {setup.model_path}\n[study] data: {setup.data.summary()}; held-out prompts: "
        f"{len(setup.held_out)}",
        flush=True,
    )
    m1_dir, sft_metrics = _sft_once(study, args, setup, out)  # phase 1: M0 -> M1, a LoRA adapter shared by every run
    timings["sft_s"] = round(time.perf_counter() - start, 1)

    runs = [(method, seed) for method in study.methods for seed in study.seeds]
    start = time.perf_counter()
    rounds, round1 = _train_runs(study, args, setup, out, m1_dir, runs)  # phase 2: every (method, seed) from M1
    timings["rounds_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    acc, per_run_acc, consistency, spent = _evaluate_runs(study, args, setup, out, m1_dir, runs)  # phase 3
    timings["evaluation_s"] = round(time.perf_counter() - start, 1)
    timings.update({k: round(v, 1) for k, v in spent.items()})
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: what the wall times would be on free cores
    timings["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)

    settings = {
        "size": study.size, **sizes, "model": setup.model_path, "seeds": study.seeds, "methods": study.methods,
        "tasks": study.tasks, "eval_mode": study.eval_mode, "num_generations": args.num_generations,
        "num_iterations": args.num_iterations, "learning_rate": args.learning_rate, "beta": args.beta,
        "round1_baseline": args.round1_baseline, "consistency_seed": 1234, "sft": sft_metrics,
        "num_train_prompts": len(setup.train_prompts), "num_held_out_prompts": len(setup.held_out),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    results = {
        "settings": settings, "accuracy": {"shared": acc, "runs": per_run_acc}, "consistency": consistency,
        "round1_baseline": round1, "rounds": rounds, "timings": timings,
    }  # fmt: skip
    results["summary"] = summarise(results)
    files = write_study_report(results, out)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"[study] wall time per phase (s): {timings}\n[study] report: {', '.join(map(str, files.values()))}")
    json.dumps(results, default=str)  # fail loudly here rather than leave a half-written report
    return results


def _check_study(study: StudyArguments, args: CreamConfig) -> None:
    unknown = set(study.methods) - set(METHODS)
    if unknown or not study.methods:
        raise ValueError(f"Unknown or no --methods {sorted(unknown)}; choose among {sorted(METHODS)}.")
    if len(set(study.seeds)) != len(study.seeds) or not study.seeds:
        raise ValueError(f"--seeds {study.seeds}: give one or more distinct seeds.")
    if study.size not in STUDY_SIZES:
        raise ValueError(f"Unknown --size {study.size!r}; choose among {sorted(STUDY_SIZES)}.")
    if args.num_iterations != 2:
        raise ValueError(
            f"--num_iterations {args.num_iterations}: the study compares M2 and M3, i.e. 2 rounds from M1 as in the "
            "paper; leave num_iterations at 2."
        )


@dataclass
class _Setup:
    """What every phase of the study shares: M0's path, the data, the tokenizer and where models go."""

    model_path: str
    data: Any
    eval_sets: dict[str, Any]
    train_prompts: Any
    held_out: list[Any]
    tokenizer: Any
    device: str | None


def _study_setup(study: StudyArguments, args: CreamConfig, sizes: dict[str, int]) -> _Setup:
    from transformers import AutoTokenizer

    from . import assets, demo_data

    model_path = study.model or str(assets.smollm2_model_dir())
    data = demo_data.build_demo_datasets(
        demo_data.DemoSizes(
            sft_mc=sizes["sft_mc"], sft_chat=sizes["sft_chat"],
            prompts=sizes["prompts"] + sizes["consistency_prompts"],
            eval_mc=sizes["eval_mc"], eval_gsm8k=1,  # GSM8K is not a study task (~0 % at 135M)
        ),
        seed=0,
    )  # fmt: skip
    unknown_tasks = set(study.tasks) - set(data.eval)
    if unknown_tasks:
        raise ValueError(f"Unknown --tasks {sorted(unknown_tasks)}; choose among {sorted(data.eval)}.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _Setup(
        model_path=model_path,
        data=data,
        eval_sets={task: data.eval[task] for task in study.tasks},
        train_prompts=data.prompts.select(range(sizes["prompts"])),
        held_out=[r["prompt"] for r in data.prompts.select(range(sizes["prompts"], len(data.prompts)))],
        tokenizer=tokenizer,
        device="cuda" if torch.cuda.is_available() and not args.use_cpu else None,
    )


def _sft_once(study: StudyArguments, args: CreamConfig, setup: _Setup, out: Path) -> tuple[Path, dict[str, Any]]:
    """SFT once, M0 -> M1, saved as a LoRA adapter in ``out/M1`` that every run starts from."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..modeling import adapters
    from ..trainer.sft import run_sft

    lora = LoraConfig(r=study.lora_r, lora_alpha=2 * study.lora_r, target_modules="all-linear")
    m1_dir = out / "M1"
    with tqdm(total=1, desc="study: SFT (M0 -> M1, once)") as bar:
        base = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32)
        sft_model = get_peft_model(base, lora)
        sft_metrics = run_sft(sft_model, setup.tokenizer, setup.data.sft, _run_args(args, out, args.seed, "kendall"))
        adapters.save_adapter(sft_model, adapters.policy_adapter_name(sft_model), m1_dir)
        setup.tokenizer.save_pretrained(m1_dir)
        del sft_model
        bar.update()
    return m1_dir, sft_metrics


def _train_runs(
    study: StudyArguments, args: CreamConfig, setup: _Setup, out: Path, m1_dir: Path, runs: list[tuple[str, int]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every (method, seed) run from the same M1: its rounds' metrics and its round-1 baselines."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..trainer.trainer import CreamTrainer

    rounds: dict[str, dict[str, Any]] = {m: {} for m in study.methods}
    round1: dict[str, dict[str, Any]] = {m: {} for m in study.methods}
    for method, seed in tqdm(runs, desc="study: rounds (method x seed)"):
        run_dir = out / method / f"seed{seed}"
        base = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32)
        policy = PeftModel.from_pretrained(base, m1_dir, is_trainable=True)
        trainer = CreamTrainer(
            model=policy, args=_run_args(args, run_dir, seed, METHODS[method]), train_dataset=setup.train_prompts,
            processing_class=setup.tokenizer,
        )  # fmt: skip
        rounds[method][str(seed)] = trainer.train().metrics["rounds"]
        round1[method][str(seed)] = _round1_baselines(trainer.round_dir(1), args.num_generations)
        del trainer, policy, base
        gc.collect()
    return rounds, round1


def _evaluate_runs(
    study: StudyArguments, args: CreamConfig, setup: _Setup, out: Path, m1_dir: Path, runs: list[tuple[str, int]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, float]]:
    """Accuracy of M0, M1 (once) and every run's M2, M3; consistency M2 vs M1, M3 vs M2 on the held-out prompts.

    Returns:
        The shared accuracies, the per-run accuracies, the per-run consistency and the seconds spent on each.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..evaluation import load_checkpoint, ranking_consistency
    from ..modeling.movement import weight_change

    tokenizer, held_out, device = setup.tokenizer, setup.held_out, setup.device
    base = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32)
    sampling_config = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip

    def accuracy(model: torch.nn.Module, name: str) -> dict[str, Any]:
        return _accuracy(model, name, study, args, setup)

    steps = 2 + 2 * len(runs) + (2 * len(runs) if held_out else 0)
    bar = tqdm(total=steps, desc="study: evaluation")
    spent = {"accuracy_s": 0.0, "consistency_s": 0.0}
    clock = time.perf_counter()
    acc: dict[str, Any] = {"M0": accuracy(base.eval(), "M0")}
    bar.update()
    acc["M1"] = accuracy(_merged(load_checkpoint(m1_dir, base=base, device=device)), "M1")
    spent["accuracy_s"] += time.perf_counter() - clock
    bar.update()
    m1 = load_checkpoint(m1_dir, base=base, device=device)  # unmerged: Table 2 scores π_0 with the adapter disabled
    per_run_acc: dict[str, dict[str, Any]] = {m: {} for m in study.methods}
    consistency: dict[str, dict[str, Any]] = {m: {} for m in study.methods}
    for method, seed in runs:
        run_dir = out / method / f"seed{seed}"
        models = {"M1": m1, **{k: load_checkpoint(run_dir / k, base=base, device=device) for k in ("M2", "M3")}}
        consistency[method][str(seed)] = {}
        clock = time.perf_counter()
        for new, old in (("M2", "M1"), ("M3", "M2")) if held_out else ():
            stats = ranking_consistency(
                models[new], models[old], None, tokenizer, held_out, args.num_generations, sampling_config,
                args.max_length, study.eval_batch_size, seed=1234, show_progress=False,
                round1_baseline=args.round1_baseline,
            )  # fmt: skip
            stats.pop("per_prompt", None)
            folders = {"M1": m1_dir, "M2": run_dir / "M2", "M3": run_dir / "M3"}
            stats["weight_change"] = weight_change(folders[old], folders[new])  # beside C: moved, or unchanged?
            consistency[method][str(seed)][f"{new} vs {old}"] = stats
            bar.update()
        spent["consistency_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        per_run_acc[method][str(seed)] = {}
        for name in ("M2", "M3"):
            per_run_acc[method][str(seed)][name] = accuracy(_merged(models.pop(name)), f"{method}/{seed}/{name}")
            bar.update()
        spent["accuracy_s"] += time.perf_counter() - clock
        del models
        gc.collect()
    bar.close()
    return acc, per_run_acc, consistency, spent


def _accuracy(
    model: torch.nn.Module, name: str, study: StudyArguments, args: CreamConfig, setup: _Setup
) -> dict[str, Any]:
    """One checkpoint's accuracy on the study's tasks, by option log-likelihood or greedy generation."""
    from ..evaluation import evaluate_accuracy, evaluate_loglikelihood

    tokenizer, eval_sets = setup.tokenizer, setup.eval_sets
    if study.eval_mode == "loglikelihood":
        results = evaluate_loglikelihood(
            model, tokenizer, eval_sets, study.eval_batch_size, args.max_length, show_progress=False, desc=name
        )
    else:
        results = evaluate_accuracy(
            model, tokenizer, eval_sets, study.eval_max_new_tokens, study.eval_batch_size, False, desc=name
        )
    keys = ("accuracy", "stderr", "n", "accuracy_norm", "stderr_norm", "mode")
    return {task: {k: getattr(r, k) for k in keys} for task, r in results.items()}


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA checkpoint with its adapter merged into its own copy of the base: the same function, faster."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
