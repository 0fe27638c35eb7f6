"""How close one CREAM round is to the cost of its unavoidable parts, and how it scales with the number of prompts.

A round t ≥ 2 cannot avoid: sampling P·N candidates from π_t, one scoring forward of every candidate under each
distinct model (π_t, π_0, π_{t−1}: three from round 2 on, two in round 1), and one DPO epoch over the pairs. This
script runs round 2 through `CreamTrainer` (π_{t−1} = M1 exists and is loaded from disk as in a real run), then, in
the same process and with the same batch sizes, times each part alone: a plain `generate` (same seed: the same
candidates), a plain forward per model already in memory, a plain AdamW epoch of the CREAM loss over the round's
pairs. Round and parts alternate; medians of `--repeats` repetitions. Prints one JSON object with the phase times,
Σ parts and round / Σ parts (goal ≤ 1.10).

`--scaling` runs the same round at P and 2P prompts, each in a fresh subprocess (alternating sizes), and reports the
time ratio (goal ≤ 2.1) and the peak RSS of each child (`resource.getrusage`, before and after the round).
`--candidates` also measures the optimisation candidates of issue #9 item 4 on the same data (`ab_switch.py` A/Bs the
ones that became `CreamConfig` switches inside the real round).

Usage:
    python benchmarks/round_cost.py --model tiny
    python benchmarks/round_cost.py --model smollm2 --prompts 8 --num_generations 4 --new_tokens 32 [--scaling]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from bench_rounds import TOKENIZER  # noqa: E402
from conftest import perturbed, tiny_llama  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from trl_cream import CreamConfig, CreamTrainer  # noqa: E402
from trl_cream.core.loss import cream_dpo_loss  # noqa: E402
from trl_cream.modeling.sampling import cut_at_stop, tokenize_prompts  # noqa: E402
from trl_cream.modeling.scoring import completion_logps, pad_pairs  # noqa: E402
from trl_cream.trainer.data import PairCollator  # noqa: E402

TokenIds = list[int]
ROUND = 2  # the benchmarked round: π_{t−1} = M1 exists, so three models score


# ------------------------------------------------------------------------------------------------ set-up
@dataclass
class Setup:
    """M0, M1, M2 saved once under ``root`` (M2 is the round's policy π_t), the tokenizer, the prompts, the config."""

    root: Path
    tokenizer: Any
    prompts: list[Any]
    config: dict[str, Any]
    models: dict[str, torch.nn.Module]

    def path(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str) -> torch.nn.Module:
        """A fresh copy of model ``name`` from disk, as a user (or CREAM for π_{t−1}) loads it."""
        dtype = next(self.models[name].parameters()).dtype
        return AutoModelForCausalLM.from_pretrained(self.path(name), dtype=dtype).to(device())

    def cream_config(self, output_dir: Path, **overrides: Any) -> CreamConfig:
        return CreamConfig(output_dir=str(output_dir), **{**self.config, **overrides})


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def questions(n: int) -> list[Any]:
    return [
        [{"role": "user", "content": f"Question {i}: what is {i} plus {i + 1}? Explain briefly."}] for i in range(n)
    ]


def build_setup(a: argparse.Namespace, root: Path) -> Setup:
    """M0 (tiny random Llama, or SmolLM2-135M-Instruct from the offline asset), M1 and M2 = small perturbations."""
    if a.model == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        m0, scale = tiny_llama(tokenizer), 0.05
    else:
        from trl_cream.recipes.assets import smollm2_model_dir

        path = smollm2_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        m0, scale = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 2e-3
    models = {"M0": m0, "M1": perturbed(m0, scale, seed=1), "M2": perturbed(m0, scale, seed=2)}
    for name, model in models.items():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        model.to(device())
    cuda = torch.cuda.is_available()
    config = dict(
        num_iterations=2, num_generations=a.num_generations, max_new_tokens=a.new_tokens, max_length=512,
        per_device_train_batch_size=a.train_batch_size, learning_rate=1e-5, warmup_steps=0, bf16=cuda,
        use_cpu=not cuda, gradient_checkpointing=False, report_to="none", logging_steps=1000, disable_tqdm=True,
        generation_batch_size=a.generation_batch_size, scoring_batch_size=a.scoring_batch_size, seed=0,
        freeze_gc=bool(a.freeze_gc), policy_logps_from_sampling=bool(a.policy_logps_from_sampling),
    )  # fmt: skip
    return Setup(root=root, tokenizer=tokenizer, prompts=questions(a.prompts), config=config, models=models)


# ------------------------------------------------------------------------------------------------ CREAM's round
@dataclass
class RoundResult:
    seconds: float
    phases: dict[str, float]
    candidates: list[list[TokenIds]]
    pairs: Dataset
    generation_config: GenerationConfig
    metrics: dict[str, Any]


def cream_round(setup: Setup, output_dir: Path, policy: torch.nn.Module, **overrides: Any) -> RoundResult:
    """Round 2 through `CreamTrainer`: policy π_2 = ``policy``, π_0 = M0 in memory, π_1 loaded from ``M1``."""
    output_dir.mkdir(parents=True)
    (output_dir / "M1").symlink_to(setup.path("M1"), target_is_directory=True)
    trainer = CreamTrainer(
        model=policy,
        ref_model=setup.models["M0"],
        args=setup.cream_config(output_dir, **overrides),
        train_dataset=Dataset.from_dict({"prompt": setup.prompts}),
        processing_class=setup.tokenizer,
    )
    sync()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's PrinterCallback logs every dict
        trainer.run_round(ROUND, list(setup.prompts))
    sync()
    seconds = time.perf_counter() - start
    metrics = trainer.round_metrics[-1]
    candidates = load_from_disk(str(trainer.round_dir(ROUND) / "candidates"))
    grouped: dict[int, list[TokenIds]] = {}
    for j, ids in zip(candidates["prompt_index"], candidates["completion_input_ids"], strict=True):
        grouped.setdefault(j, []).append(ids)
    return RoundResult(
        seconds=seconds,
        phases={k[5:-2]: v for k, v in metrics.items() if k.startswith("time_")},
        candidates=[grouped[j] for j in sorted(grouped)],
        pairs=load_from_disk(str(trainer.round_dir(ROUND) / "pairs")),
        generation_config=copy.deepcopy(trainer.generation_config),
        metrics=metrics,
    )


# ------------------------------------------------------------------------------------------------ the parts alone
@torch.no_grad()
def plain_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[TokenIds],
    num_generations: int,
    generation_config: GenerationConfig,
    batch_size: int,
    pad_id: int,
    with_logps: bool = False,
) -> list[list[TokenIds]] | tuple[list[list[TokenIds]], torch.Tensor]:
    """``generate`` on left-padded batches of ``batch_size`` prompts × N, cut at the first stop token.

    With ``with_logps`` (issue #9 item 4), also returns the ``[P, N]`` sums of ``log π(y_k | x, y_<k)`` of the kept
    tokens, from the raw logits that ``generate(output_logits=True)`` returns (before temperature and top-p).
    """
    model.eval()
    stop = generation_config.eos_token_id
    stop_ids = [stop] if isinstance(stop, int) else list(stop)
    out: list[list[TokenIds]] = []
    sums: list[list[float]] = []
    extra = {"output_logits": True, "return_dict_in_generate": True} if with_logps else {}
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        ids, mask = ids.repeat_interleave(num_generations, 0), mask.repeat_interleave(num_generations, 0)
        generated = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=generation_config,
            **extra,
        )  # fmt: skip
        tokens = generated.sequences[:, width:] if with_logps else generated[:, width:]
        rows = [cut_at_stop(r, stop_ids, pad_id) for r in tokens.tolist()]
        out.extend(rows[p * num_generations : (p + 1) * num_generations] for p in range(len(chunk)))
        if with_logps:
            logits = torch.stack(generated.logits, 1).float()  # [B, T, V]
            token_logps = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            kept = [token_logps[r, : len(row)].sum().item() for r, row in enumerate(rows)]
            sums.extend(kept[p * num_generations : (p + 1) * num_generations] for p in range(len(chunk)))
    return (out, torch.tensor(sums)) if with_logps else out


def plain_score(
    model: torch.nn.Module,
    prompt_ids: Sequence[TokenIds],
    candidates: Sequence[Sequence[TokenIds]],
    pad_id: int,
    batch_size: int,
    inference_mode: bool = False,
) -> torch.Tensor:
    """One forward of every candidate (in order, no de-duplication) under ``model``: ``[P, N]`` summed log-probs."""
    model.eval()
    flat = [(p, c) for p, cands in zip(prompt_ids, candidates, strict=True) for c in cands]
    sums = []
    with torch.inference_mode() if inference_mode else torch.no_grad():
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            tensors = pad_pairs([p for p, _ in batch], [c for _, c in batch], pad_id, model.device)
            sums.append(completion_logps(model, *tensors).sum(-1).float().cpu())
    return torch.cat(sums).view(len(candidates), -1)


def plain_dpo_epoch(
    model: torch.nn.Module, pairs: Dataset, pad_id: int, max_length: int, batch_size: int, lr: float, beta: float
) -> float:
    """One epoch of the CREAM loss (reference log-probs from the pairs) with a plain AdamW loop. Returns the mean
    loss."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    collate, losses = PairCollator(pad_id, max_length), []
    rows = pairs.to_list()
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size]).items()}
        logps = completion_logps(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
        ).sum(-1)
        chosen, rejected = logps.chunk(2)
        loss = cream_dpo_loss(
            chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["consistency"], beta
        ).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return statistics.fmean(losses) if losses else 0.0


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def time_parts(setup: Setup, result: RoundResult, prompt_ids: list[TokenIds]) -> dict[str, float]:
    """Each unavoidable part of the round alone, on the round's own data and batch sizes."""
    c, pad_id = setup.config, setup.tokenizer.pad_token_id
    gen_config = copy.deepcopy(result.generation_config)
    gen_config.use_cache = True
    policy = copy.deepcopy(setup.models["M2"])
    set_seed(c["seed"] + ROUND)  # the round's seed: the same draws, hence the same candidates
    parts: dict[str, float] = {}
    parts["generate"], candidates = clock(
        lambda: plain_generate(
            policy, prompt_ids, c["num_generations"], gen_config, c["generation_batch_size"], pad_id
        )
    )
    if candidates != result.candidates:
        raise AssertionError("The plain generate did not reproduce the round's candidates (same seed and batches).")
    for name, model in (
        ("score_pi_t", policy),
        ("score_pi_0", setup.models["M0"]),
        ("score_pi_t-1", setup.models["M1"]),
    ):
        parts[name], _ = clock(lambda m=model: plain_score(m, prompt_ids, candidates, pad_id, c["scoring_batch_size"]))
    parts["train"], _ = clock(
        lambda: plain_dpo_epoch(
            policy, result.pairs, pad_id, c["max_length"], c["per_device_train_batch_size"], c["learning_rate"], 0.1
        )
    )
    return parts


# ------------------------------------------------------------------------------------------------ item 4 candidates
def time_candidates(setup: Setup, result: RoundResult, prompt_ids: list[TokenIds]) -> dict[str, float]:
    """Item 4: π_t's log-probs from the sampling pass; larger / inference-mode scoring batches; checkpointing."""
    c, pad_id = setup.config, setup.tokenizer.pad_token_id
    gen_config = copy.deepcopy(result.generation_config)
    gen_config.use_cache = True
    policy = copy.deepcopy(setup.models["M2"])
    out: dict[str, float] = {}
    set_seed(c["seed"] + ROUND)
    out["generate_with_logits"], (cands, sums) = clock(
        lambda: plain_generate(
            policy, prompt_ids, c["num_generations"], gen_config, c["generation_batch_size"], pad_id, with_logps=True
        )
    )
    forward = plain_score(policy, prompt_ids, cands, pad_id, c["scoring_batch_size"])
    out["logps_from_sampling_max_abs_diff"] = (torch.tensor(sums) - forward).abs().max().item()
    out["logps_from_sampling_max_rel_diff"] = (
        ((torch.tensor(sums) - forward).abs() / forward.abs().clamp_min(1)).max().item()
    )
    for bs in sorted({c["scoring_batch_size"], 4 * c["scoring_batch_size"]}):
        for mode in (False, True):
            key = f"score_bs{bs}_{'inference_mode' if mode else 'no_grad'}"
            out[key], _ = clock(lambda b=bs, m=mode: plain_score(policy, prompt_ids, cands, pad_id, b, m))
    for ckpt in (False, True):
        model = copy.deepcopy(setup.models["M2"])
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out[f"train_checkpointing_{'on' if ckpt else 'off'}"], _ = clock(
            lambda m=model: plain_dpo_epoch(
                m, result.pairs, pad_id, c["max_length"], c["per_device_train_batch_size"], c["learning_rate"], 0.1
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ runs
def median_dict(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def run_cost(a: argparse.Namespace) -> dict[str, Any]:
    """Round and parts alternated ``a.repeats`` times in this process; medians and ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(a, Path(tmp))
        prompt_ids = tokenize_prompts(setup.tokenizer, setup.prompts)
        rounds, phases, parts, candidates = [], [], [], []
        for rep in range(a.repeats):
            result = cream_round(setup, Path(tmp) / f"cream_{rep}", copy.deepcopy(setup.models["M2"]))
            rounds.append({"round": result.seconds})
            phases.append(result.phases)
            parts.append(time_parts(setup, result, prompt_ids))
            if a.candidates:
                candidates.append(time_candidates(setup, result, prompt_ids))
        num_pairs = len(result.pairs)
    part = median_dict(parts)
    round_s = statistics.median(r["round"] for r in rounds)
    per_rep_ratio = [r["round"] / sum(p.values()) for r, p in zip(rounds, parts, strict=True)]
    per_rep_ratio_no_save = [
        (r["round"] - ph["save"]) / sum(p.values()) for r, ph, p in zip(rounds, phases, parts, strict=True)
    ]
    result_dict = {
        "benchmark": "round_cost",
        "model": a.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "prompts": a.prompts,
        "num_generations": a.num_generations,
        "new_tokens": a.new_tokens,
        "round_index": ROUND,
        "num_pairs": num_pairs,
        "repeats": a.repeats,
        "round_phases_s": median_dict(phases),
        "parts_s": part,
        "round_s": round(round_s, 4),
        "sum_parts_s": round(sum(part.values()), 4),
        "round_over_parts": round(statistics.median(per_rep_ratio), 4),
        "round_without_save_over_parts": round(statistics.median(per_rep_ratio_no_save), 4),
    }
    if candidates:
        result_dict["candidates"] = median_dict(candidates)
    return result_dict


def run_child(a: argparse.Namespace) -> dict[str, Any]:
    """One round in this (fresh) process, with its peak RSS before and after (KiB on Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(a, Path(tmp))
        policy = copy.deepcopy(setup.models["M2"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = cream_round(setup, Path(tmp) / "cream", policy)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "prompts": a.prompts,
        "round_s": result.seconds,
        **{f"{k}_s": v for k, v in result.phases.items()},
        "maxrss_before_round_mib": before / 1024,
        "maxrss_after_round_mib": after / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def run_scaling(a: argparse.Namespace) -> dict[str, Any]:
    """Rounds at P and 2P prompts, each in a fresh subprocess, sizes alternating; medians and the time ratio."""
    sizes, rows = (a.prompts, 2 * a.prompts), {a.prompts: [], 2 * a.prompts: []}
    for _ in range(a.repeats):
        for p in sizes:
            argv = [sys.executable, __file__, "--child", "--prompts", str(p)] + child_flags(a)
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            rows[p].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {
        p: {k: statistics.median(r[k] for r in rows[p]) for k in rows[p][0] if rows[p][0][k] is not None}
        for p in sizes
    }
    return {
        "benchmark": "scaling",
        "model": a.model,
        "repeats": a.repeats,
        "sizes": {str(p): {k: round(v, 3) for k, v in med[p].items()} for p in sizes},
        "time_ratio_2x": round(med[sizes[1]]["round_s"] / med[sizes[0]]["round_s"], 4),
        "rss_growth_ratio_2x": round(
            (med[sizes[1]]["maxrss_after_round_mib"] - med[sizes[1]]["maxrss_before_round_mib"])
            / max(med[sizes[0]]["maxrss_after_round_mib"] - med[sizes[0]]["maxrss_before_round_mib"], 1e-9),
            4,
        ),
    }


def child_flags(a: argparse.Namespace) -> list[str]:
    names = (
        "model",
        "num_generations",
        "new_tokens",
        "generation_batch_size",
        "scoring_batch_size",
        "train_batch_size",
        "freeze_gc",
    )
    flags = [x for n in names for x in (f"--{n}", str(getattr(a, n)))]
    return flags + (["--policy_logps_from_sampling"] if a.policy_logps_from_sampling else [])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--generation_batch_size", type=int, default=8)
    p.add_argument("--scoring_batch_size", type=int, default=16)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--candidates", action="store_true", help="also time the item-4 optimisation candidates")
    p.add_argument("--scaling", action="store_true", help="run the P vs 2P scaling in fresh subprocesses instead")
    p.add_argument("--freeze_gc", type=int, choices=[0, 1], default=1, help="CreamConfig.freeze_gc of CREAM's round")
    p.add_argument(
        "--policy_logps_from_sampling", action="store_true", help="CreamConfig.policy_logps_from_sampling=True"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result = run_child(a) if a.child else run_scaling(a) if a.scaling else run_cost(a)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
