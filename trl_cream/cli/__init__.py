"""The `trl-cream` command: `train` (SFT + CREAM rounds), `eval` (Table 1 and 2 for saved iterations), `demo`,
`study` (SRLM vs CREAM over seeds) and `inspect` (a run as one HTML page).

Every subcommand is parsed by TRL's `TrlParser`, so `--config file.yaml` sets any field and command-line flags
override the file, as with `trl sft`/`trl dpo`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import check_local, load_data

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

USAGE = """usage: trl-cream {train,eval,demo,study,inspect} [--config FILE.yaml] [--field value ...]

CREAM: Consistency Regularized Self-Rewarding Language Models (ICLR 2025) on Hugging Face TRL.

commands:
  train   SFT stage (optional) + CREAM rounds from a model, prompts and CreamConfig fields
  eval    accuracy of saved iterations (Table 1) and ranking consistency between them (Table 2)
  demo    the offline end-to-end demo: SmolLM2-135M, M0 -> M1 -> M2 -> M3, then Table 1 and Table 2
  study   SRLM vs CREAM from one shared M1 over seeds: Table 1/2 with mean ± std and standard errors
  inspect one self-contained HTML page of a run or a study (read-only; also while it trains)

Run `trl-cream <command> --help` for every option of a command.
"""


@dataclass
class TrainScriptArguments:
    """Data and model sources of `trl-cream train` (the model itself is described by TRL's ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Prompts: a Hub dataset id, a `save_to_disk` folder or a .json/.jsonl/.csv/.parquet file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split holding the prompts."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompts (renamed to `prompt`)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    sft_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Seed SFT data (`messages` or `prompt`/`completion`); runs the SFT stage M0 -> M1 first."},
    )
    sft_dataset_split: str = field(default="train", metadata={"help": "Split of the SFT dataset."})
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "π_0 (M0) for full fine-tuning when `model_name_or_path` is already M1 (no SFT stage)."},
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "M1 as a LoRA adapter on `model_name_or_path` (π_0 = the base with adapters disabled)."},
    )

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(
                f"--max_prompts {self.max_prompts}: give a positive number of prompts, or leave it out to use them "
                "all."
            )


@dataclass
class EvalArguments:
    """Arguments of `trl-cream eval`."""

    checkpoints: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Iterations in order, as NAME=PATH (e.g. M0=HuggingFaceTB/SmolLM2-135M-Instruct M1=out/M1)."
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of adapter checkpoints (default: from adapter_config.json)."}
    )
    size: str = field(
        default="small",
        metadata={"help": "Size of the offline benchmark subsets.", "choices": ["tiny", "small", "medium", "full"]},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k"],
        metadata={"help": "Tasks to evaluate."},
    )
    eval_mode: str = field(
        default="generate",
        metadata={
            "help": "How multiple-choice tasks are scored: 'generate' (greedy answer, letter extracted; the paper's "
            "protocol) or 'loglikelihood' (each option's log-prob after the question, acc and acc_norm; signal on "
            "small models). GSM8K always generates.",
            "choices": ["generate", "loglikelihood"],
        },
    )
    task_modes: list[str] = field(
        default_factory=list,
        metadata={"help": "Per-task overrides of --eval_mode as TASK=MODE (e.g. arc_easy=generate)."},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Log-likelihood mode: put the question through the chat template (else 'Question: ...')."},
    )
    round1_baseline: str = field(
        default="mean_logp",
        metadata={"help": "Table 2's r' against M0's successor (M1).", "choices": ["mean_logp", "sum_logp"]},
    )
    consistency_prompts: int = field(default=8, metadata={"help": "Prompts for Table 2 (0 skips it)."})
    num_generations: int = field(default=4, metadata={"help": "Candidates per prompt for Table 2."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy token budget per answer."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of Table 2's candidates."})
    top_p: float = field(default=0.95, metadata={"help": "Top-p of Table 2's candidates."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Token budget of Table 2's candidates."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    output_dir: str = field(default="cream_eval", metadata={"help": "Where results.{json,md,png} are written."})
    seed: int = field(default=0, metadata={"help": "Sampling seed for Table 2."})


def train_parser() -> Any:
    """The `trl-cream train` parser: script arguments, every CreamConfig field and TRL's ModelConfig."""
    from trl import ModelConfig

    from ..trainer.config import CreamConfig
    from .parsing import build_parser

    titles = {TrainScriptArguments: "data (trl-cream train)", ModelConfig: "model (TRL's ModelConfig)"}
    return build_parser((TrainScriptArguments, CreamConfig, ModelConfig), "trl-cream train", titles)


def train_main(argv: list[str]) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from ..hub.model_card import rounds_table
    from ..trainer.trainer import CreamTrainer
    from .parsing import setup_logging

    parser = train_parser()
    script, args, model_args = parser.parse_args_and_config(_bare_resume_flag(argv))
    setup_logging(args)
    if script.dataset_name is None:
        parser.error("--dataset_name (the prompts) is required.")
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path (M0, or M1 with --ref_model_name_or_path) is required.")
    prompts = load_data(script.dataset_name, script.dataset_train_split, script.dataset_config)
    if script.prompt_column != "prompt":
        prompts = prompts.rename_column(script.prompt_column, "prompt")
    if script.max_prompts is not None:
        prompts = prompts.select(range(min(script.max_prompts, len(prompts))))
    sft = load_data(script.sft_dataset_name, script.sft_dataset_split) if script.sft_dataset_name else None

    quantization = get_quantization_config(model_args)
    kwargs: dict[str, Any] = {
        "dtype": model_args.dtype,
        "revision": model_args.model_revision,
        "trust_remote_code": args.trust_remote_code,
    }
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=_quantized_device_map())
    check_local(model_args.model_name_or_path, "--model_name_or_path")
    if script.ref_model_name_or_path:
        check_local(script.ref_model_name_or_path, "--ref_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=args.trust_remote_code
    )
    ref_model, peft_config = None, None
    if script.adapter_name_or_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, script.adapter_name_or_path, is_trainable=True)
    elif model_args.use_peft:
        peft_config = get_peft_config(model_args)
    if script.ref_model_name_or_path:
        ref_model = AutoModelForCausalLM.from_pretrained(script.ref_model_name_or_path, **kwargs)
    trainer = CreamTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=peft_config,
        sft_dataset=sft,
    )
    output = trainer.train(resume_from_checkpoint=_resume_value(args.resume_from_checkpoint))
    rounds = output.metrics["rounds"]
    trainer.accelerator.print(f"\nCREAM done: {len(rounds)} rounds, iterations in {args.output_dir}\n")
    trainer.accelerator.print(rounds_table(rounds))
    return 0


def _bare_resume_flag(argv: list[str]) -> list[str]:
    """``--resume_from_checkpoint`` given without a value means ``--resume_from_checkpoint true``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume_from_checkpoint" and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out.insert(i + 1, "true")
            break
    return out


def _resume_value(value: str | None) -> str | bool | None:
    """``true``/``yes``/``1`` (any case) resume the run in ``output_dir``; ``false``/``no``/``0`` start afresh; any
    other value is the output_dir or an intra-round checkpoint folder."""
    if value is None or str(value).lower() in {"false", "no", "0", ""}:
        return None
    return True if str(value).lower() in {"true", "yes", "1"} else value


def _quantized_device_map() -> dict[str, Any] | str:
    """A k-bit model goes whole onto this process's GPU (each rank its own under `accelerate launch`)."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else "cpu"


def parse_task_modes(default: str, overrides: list[str], tasks: list[str]) -> dict[str, str] | str:
    """Task -> evaluation mode from ``--eval_mode`` and ``--task_modes TASK=MODE``; an error message on bad input.

    GSM8K has no options, so it is scored by generation unless named explicitly (which is then an error).
    """
    modes = {task: ("generate" if task == "gsm8k" else default) for task in tasks}
    for spec in overrides:
        task, sep, mode = spec.partition("=")
        if not sep or task not in modes or mode not in ("generate", "loglikelihood"):
            return (
                f"--task_modes {spec!r}: expected TASK=MODE with TASK among {tasks} and MODE generate or "
                "loglikelihood."
            )
        modes[task] = mode
    return modes


def eval_main(argv: list[str]) -> int:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from ..evaluation import run_evaluation
    from ..evaluation.report import render_markdown
    from ..recipes.demo_data import build_demo_datasets
    from .parsing import build_parser

    parser = build_parser((EvalArguments,), "trl-cream eval")
    (args,) = parser.parse_args_and_config(argv)
    if len(args.checkpoints) < 1:
        parser.error("--checkpoints needs at least one NAME=PATH (e.g. --checkpoints M0=base M1=out/M1).")
    checkpoints = {}
    for k, spec in enumerate(args.checkpoints):
        name, _, path = spec.rpartition("=") if "=" in spec else (f"M{k}", "", spec)
        checkpoints[name] = path
    first = next(iter(checkpoints))
    print(
        f"trl-cream eval: the first checkpoint, {first} ({checkpoints[first]}), is taken as π_0 (the reference of "
        f"every implicit reward log π − log π_0); Table 2 compares each later checkpoint with the one before it "
        f"({len(checkpoints) - 1} pair(s)). If {first} is not the initial model M0, list M0 first "
        "(--checkpoints M0=<base> M1=... M2=...).",
        flush=True,
    )
    for name, path in checkpoints.items():  # before the tokenizer and data: a folder that is no model is named
        folder = Path(path)
        if folder.is_dir() and not ((folder / "config.json").exists() or (folder / "adapter_config.json").exists()):
            parser.error(
                f"--checkpoints {name}={path}: that folder holds no model (neither config.json nor "
                "adapter_config.json). Give a saved model or adapter folder (e.g. output_dir/M2), or a Hub id."
            )
    unknown = set(args.tasks) - {"arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k"}
    if unknown:
        parser.error(f"unknown --tasks {sorted(unknown)}; choose among arc_easy arc_challenge openbookqa siqa gsm8k.")
    modes = parse_task_modes(args.eval_mode, args.task_modes, args.tasks)
    if isinstance(modes, str):
        parser.error(modes)
    data = build_demo_datasets(args.size, seed=args.seed)
    eval_sets = {task: data.eval[task] for task in args.tasks}
    prompts = [row["prompt"] for row in data.prompts.select(range(min(args.consistency_prompts, len(data.prompts))))]
    tokenizer = AutoTokenizer.from_pretrained(args.base_model or next(iter(checkpoints.values())))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.sample_max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    results = run_evaluation(
        checkpoints, eval_sets, prompts, args.output_dir, tokenizer, base=args.base_model,
        max_new_tokens=args.max_new_tokens, num_generations=args.num_generations, batch_size=args.batch_size,
        seed=args.seed, generation_config=sampling, device="cuda" if torch.cuda.is_available() else None,
        eval_mode=modes, chat_template=args.chat_template, round1_baseline=args.round1_baseline,
    )  # fmt: skip
    print(render_markdown(results))
    print(f"Report written to {args.output_dir}/results.{{json,md,png}}")
    return 0


def demo_main(argv: list[str]) -> int:
    import torch

    from ..recipes.demo import DEMO_DEFAULTS, DemoArguments, run_demo
    from ..trainer.config import CreamConfig
    from .parsing import build_parser, setup_logging

    parser = build_parser((DemoArguments, CreamConfig), "trl-cream demo", {DemoArguments: "demo"})
    parser.set_defaults(**DEMO_DEFAULTS, use_cpu=not torch.cuda.is_available())
    demo, args = parser.parse_args_and_config(argv)
    setup_logging(args)
    run_demo(demo, args)
    return 0


def study_main(argv: list[str]) -> int:
    import torch

    from ..recipes.study import StudyArguments, run_study, study_defaults
    from ..trainer.config import CreamConfig
    from .parsing import build_parser, setup_logging

    parser = build_parser((StudyArguments, CreamConfig), "trl-cream study", {StudyArguments: "study"})
    size, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # the preset's N as a default
    parser.set_defaults(**study_defaults(size.size), use_cpu=not torch.cuda.is_available())
    study, args = parser.parse_args_and_config(argv)
    setup_logging(args)
    run_study(study, args)
    return 0


def inspect_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trl-cream inspect",
        description="Write one self-contained HTML page of a CREAM run (or of a `trl-cream study`'s runs side by "
        "side): lineage, plots, and every round's prompts with their candidates ranked under both models. Reads the "
        "run without writing in it or taking its lock, so it also works while the run trains.",
    )
    parser.add_argument("output_dir", help="The output_dir of a `trl-cream train`/`demo` run or of a study.")
    parser.add_argument("--output", default=None, help="Where to write the page (default: OUTPUT_DIR/inspect.html).")
    args = parser.parse_args(argv)
    from ..inspection.page import write_page

    try:
        path = write_page(args.output_dir, args.output)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"Page written to {path}")
    return 0


COMMANDS = {"train": train_main, "eval": eval_main, "demo": demo_main, "study": study_main, "inspect": inspect_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-cream: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)
