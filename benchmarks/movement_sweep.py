"""How far do CREAM rounds move SmolLM2-135M on CPU? A small sweep over learning rate, epochs and prompts per round.

Every setting starts from the same M1 (an adapter folder, e.g. the `M1` of a `trl-cream study` run) and runs the
study's two rounds M1 -> M2 -> M3 with one seed, recording per round: the relative change of the LoRA adapter
``‖θ_k − θ_{k−1}‖ / ‖θ_{k−1}‖``, the round's C and τ, the DPO steps and the wall time. ``--eval N`` also scores M1,
M2 and M3 on N questions of ARC-Easy and SIQA by option log-likelihood (lm-evaluation-harness definitions) and
counts the questions whose prediction changed. One JSON line per setting on stdout, and ``--out FILE`` collects them.

    python benchmarks/movement_sweep.py --m1 cream_study/M1 --setting lr=1e-3,epochs=3,prompts=8 --eval 200
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def parse_setting(text: str) -> dict[str, Any]:
    """``"lr=1e-3,epochs=3,prompts=8,method=cream"`` -> a dict with the defaults filled in."""
    setting: dict[str, Any] = {"lr": 1e-4, "epochs": 1.0, "prompts": 8, "method": "cream", "seed": 0}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key not in setting:
            raise ValueError(f"Unknown setting {key!r} in {text!r}; known: {sorted(setting)}.")
        setting[key] = type(setting[key])(value)
    return setting


def run_setting(setting: dict[str, Any], m1: Path, model_path: str, out: Path, eval_n: int) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_cream import CreamConfig, CreamTrainer
    from trl_cream.evaluation import TaskResult, evaluate_loglikelihood, load_checkpoint
    from trl_cream.modeling.movement import weight_change
    from trl_cream.recipes import demo_data
    from trl_cream.recipes.study import METHODS, study_defaults

    data = demo_data.build_demo_datasets(
        demo_data.DemoSizes(
            sft_mc=8, sft_chat=0, prompts=2 * setting["prompts"], eval_mc=max(eval_n, 1), eval_gsm8k=1
        ),
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    run_dir = out / "_".join(f"{k}{v}" for k, v in setting.items())
    args = CreamConfig(
        **{
            **study_defaults("default"), "output_dir": str(run_dir), "learning_rate": setting["lr"],
            "num_train_epochs": setting["epochs"], "seed": setting["seed"], "use_cpu": True, "disable_tqdm": True,
            "consistency_measure": METHODS[setting["method"]], "overwrite_output_dir": True,
        }
    )  # fmt: skip
    start = time.perf_counter()
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), m1, is_trainable=True
    )
    rounds = CreamTrainer(model=policy, args=args, train_dataset=data.prompts, processing_class=tokenizer).train()
    rounds = rounds.metrics["rounds"]
    result: dict[str, Any] = {"setting": setting, "train_wall_s": round(time.perf_counter() - start, 1)}
    result["rounds"] = [
        {
            "round": r["round"], "consistency": r["consistency"], "kendall_tau": r.get("kendall_tau_mean"),
            "num_pairs": r.get("num_pairs"), "train_steps": r.get("train_steps"), "train_loss": r.get("train_loss"),
            "weight_change": weight_change(m1 if r["round"] == 1 else run_dir / f"M{r['round']}",
                                           run_dir / f"M{r['round'] + 1}"),
        }
        for r in rounds
    ]  # fmt: skip
    result["weight_change_M3_vs_M1"] = weight_change(m1, run_dir / "M3")
    del policy
    gc.collect()
    if eval_n:
        start = time.perf_counter()
        sets = {task: data.eval[task] for task in ("arc_easy", "siqa")}
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        scored, cache = {}, out / f"M1_eval_{eval_n}.json"  # M1 is the same for every setting: scored once
        if cache.exists():
            scored["M1"] = {t: TaskResult(**r) for t, r in json.loads(cache.read_text()).items()}
        for name, path in (("M1", m1), ("M2", run_dir / "M2"), ("M3", run_dir / "M3")):
            if name in scored:
                continue
            model = load_checkpoint(path, base=base).merge_and_unload()
            scored[name] = evaluate_loglikelihood(model, tokenizer, sets, 16, args.max_length, show_progress=False)
            del model
        cache.write_text(json.dumps({t: asdict(r) for t, r in scored["M1"].items()}, default=float))
        result["accuracy"] = {
            name: {t: {"acc": r.accuracy, "stderr": r.stderr, "acc_norm": r.accuracy_norm} for t, r in res.items()}
            for name, res in scored.items()
        }

        def changed(task: str, name: str) -> int:
            pairs = zip(scored[name][task].predictions, scored["M1"][task].predictions, strict=True)
            return sum(a["prediction"] != b["prediction"] for a, b in pairs)

        result["changed_predictions_vs_M1"] = {name: {t: changed(t, name) for t in sets} for name in ("M2", "M3")}
        result["eval_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m1", required=True, type=Path, help="M1 adapter folder (e.g. a study's M1).")
    parser.add_argument("--model", default=None, help="M0. Default: the offline SmolLM2-135M-Instruct.")
    parser.add_argument("--setting", action="append", required=True, help="e.g. lr=1e-3,epochs=3,prompts=8")
    parser.add_argument("--eval", type=int, default=0, help="Questions per task for M1/M2/M3 accuracy (0: none).")
    parser.add_argument("--output_dir", type=Path, default=Path("movement_sweep"))
    parser.add_argument("--out", type=Path, default=None, help="Append the JSON lines to this file.")
    args = parser.parse_args(argv)
    if args.model is None:
        from trl_cream.recipes import assets

        args.model = str(assets.smollm2_model_dir())
    results = []
    for text in args.setting:
        result = run_setting(parse_setting(text), args.m1, args.model, args.output_dir, args.eval)
        line = json.dumps(result, default=float)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
