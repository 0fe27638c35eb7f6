"""One CREAM round against the same round composed by hand from TRL today, alternated in one process.

CREAM arm: load π_t (M2) and π_0 (M0), build a `CreamTrainer`, run round 2 (it samples, scores under π_t, π_0 and
π_{t−1} = M1 loaded from disk, pairs, trains on its stored reference log-probs, saves M3).

Naive arm, what a user writes with TRL's `DPOTrainer`: load π_t, sample with `generate` (same seed and batches, so the
same candidates), score every candidate with a plain full-logits forward, then load π_0 and π_{t−1} one at a time and
score again, build the best/worst pairs with the same rewards and consistency (`trl_cream.core.labelling.label_round`),
decode them into a text preference dataset and train one epoch with `DPOTrainer`, which tokenizes the texts, loads
its own reference copy of π_t and recomputes the reference log-probs; save M3. TRL's sigmoid loss has no
consistency weight, so the naive arm trains with C ≡ 1: the same compute, not the same loss.

Both arms must train on the same pairs (same prompt, chosen and rejected candidates): checked every repetition.
Prints one JSON object with the medians and CREAM / naive (goal ≤ 0.75).

Usage: python benchmarks/vs_naive.py --model smollm2 --prompts 8 --num_generations 4 --new_tokens 32 --repeats 3
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from datasets import Dataset  # noqa: E402
from round_cost import ROUND, Setup, build_setup, cream_round, parser, plain_generate, sync  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_cream.core.labelling import RoundScores, label_round  # noqa: E402
from trl_cream.modeling.sampling import tokenize_prompts  # noqa: E402


@torch.no_grad()
def naive_score(model: torch.nn.Module, prompt_ids: list, candidates: list, pad_id: int, size: int) -> torch.Tensor:
    """The usual hand-written scorer: right-padded prompt+completion, full logits, log-softmax, gather."""
    model.eval()
    flat = [(p, c) for p, cands in zip(prompt_ids, candidates, strict=True) for c in cands]
    sums = []
    for start in range(0, len(flat), size):
        batch = flat[start : start + size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, (p, c) in enumerate(batch):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = True
        ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
        logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token = logps.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sums.append((token * labels[:, 1:]).sum(-1).cpu())
    return torch.cat(sums).view(len(candidates), -1)


def naive_round(setup: Setup, output_dir: Path) -> dict[str, Any]:
    """The round composed by hand: generate, three scoring passes on separately loaded models, DPOTrainer."""
    c, tok = setup.config, setup.tokenizer
    pad_id = tok.pad_token_id
    times: dict[str, float] = {}
    start = time.perf_counter()
    policy = setup.load("M2")
    model_eos = policy.generation_config.eos_token_id
    eos = [tok.eos_token_id] + [
        e for e in ([model_eos] if isinstance(model_eos, int) else model_eos or []) if e != tok.eos_token_id
    ]
    generation_config = GenerationConfig(
        max_new_tokens=c["max_new_tokens"], do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
        pad_token_id=pad_id, bos_token_id=tok.bos_token_id, eos_token_id=eos, use_cache=True,
    )  # fmt: skip
    set_seed(c["seed"] + ROUND)
    prompt_ids = tokenize_prompts(tok, setup.prompts)
    candidates = plain_generate(
        policy, prompt_ids, c["num_generations"], generation_config, c["generation_batch_size"], pad_id
    )
    times["generate"] = time.perf_counter() - start
    scores = {"M2": naive_score(policy, prompt_ids, candidates, pad_id, c["scoring_batch_size"])}
    for name in ("M0", "M1"):
        model = setup.load(name)
        scores[name] = naive_score(model, prompt_ids, candidates, pad_id, c["scoring_batch_size"])
        del model
        gc.collect()
    times["score"] = time.perf_counter() - start - times["generate"]
    lengths = torch.tensor([[len(x) for x in cands] for cands in candidates])
    labels = label_round(RoundScores(scores["M2"], scores["M0"], scores["M1"], lengths), "kendall", "dataset")
    p = labels.pairs
    index = [
        (int(j), int(i), int(k)) for j, i, k in zip(p.prompt_index, p.chosen_index, p.rejected_index, strict=True)
    ]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    texts = Dataset.from_dict(
        {
            "prompt": [decode(prompt_ids[j]) for j, _, _ in index],
            "chosen": [decode(candidates[j][i]) for j, i, _ in index],
            "rejected": [decode(candidates[j][k]) for j, _, k in index],
        }
    )
    dpo_args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=c["per_device_train_batch_size"],
        learning_rate=c["learning_rate"], num_train_epochs=1, beta=0.1, max_length=c["max_length"],
        bf16=c["bf16"], use_cpu=c["use_cpu"], gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1000, disable_tqdm=True, seed=c["seed"], lr_scheduler_type="linear", warmup_steps=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=policy, args=dpo_args, train_dataset=texts, processing_class=tok)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    trainer.save_model(str(output_dir / "M3"))
    sync()
    total = time.perf_counter() - start
    times["train_and_save"] = total - times["generate"] - times["score"]
    token_match = [
        trainer.train_dataset[r]["chosen_ids"] == candidates[j][i]
        and trainer.train_dataset[r]["rejected_ids"] == candidates[j][k]
        for r, (j, i, k) in enumerate(index)
    ]
    del trainer, policy
    gc.collect()
    return {"seconds": total, "phases": times, "candidates": candidates, "index": index, "token_match": token_match}


def cream_arm(setup: Setup, output_dir: Path) -> dict[str, Any]:
    """CREAM from the same starting point: load π_t and π_0, build the trainer, run the round (π_{t−1} from disk)."""
    start = time.perf_counter()
    policy, initial = setup.load("M2"), setup.load("M0")
    models = setup.models
    setup.models = {**models, "M0": initial}
    try:
        result = cream_round(setup, output_dir, policy)
    finally:
        setup.models = models
    sync()
    seconds = time.perf_counter() - start
    p = result.pairs
    index = list(zip(p["prompt_index"], p["chosen_index"], p["rejected_index"], strict=True))
    del policy, initial
    gc.collect()
    return {"seconds": seconds, "round_s": result.seconds, "candidates": result.candidates, "index": index}


def run(a: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(a, Path(tmp))
        rows, same_pairs, token_match = [], [], []
        for rep in range(a.repeats):
            arms = {}
            order = ("cream", "naive") if rep % 2 == 0 else ("naive", "cream")  # A/B, then B/A
            for arm in order:
                out = Path(tmp) / f"{arm}_{rep}"
                arms[arm] = cream_arm(setup, out) if arm == "cream" else naive_round(setup, out)
            same_pairs.append(
                arms["cream"]["candidates"] == arms["naive"]["candidates"]
                and sorted(arms["cream"]["index"]) == sorted(arms["naive"]["index"])
            )
            token_match.extend(arms["naive"]["token_match"])
            rows.append(
                {
                    "cream_s": arms["cream"]["seconds"],
                    "naive_s": arms["naive"]["seconds"],
                    "ratio": arms["cream"]["seconds"] / arms["naive"]["seconds"],
                    **{f"naive_{k}_s": v for k, v in arms["naive"]["phases"].items()},
                }
            )
        num_pairs = len(arms["cream"]["index"])
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    return {
        "benchmark": "vs_naive",
        "model": a.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "prompts": a.prompts,
        "num_generations": a.num_generations,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "num_pairs": num_pairs,
        "same_pairs": all(same_pairs),
        "dpo_trainer_token_identical_fraction": round(sum(token_match) / max(len(token_match), 1), 4),
        "medians": med,
        "cream_over_naive": med["ratio"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    result = run(a)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
