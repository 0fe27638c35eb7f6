"""What a run shows its user (`trl_cream.trainer.schedule`, `run_log`, `report`): the whole-step warm-up, the README
quickstart training every round with one console line each and one ordered TensorBoard run, and the flag on a round
that learns nothing."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.trainer.report import LearningRateProbe, no_op_reason, round_line, tidy
from trl_cream.trainer.schedule import SFTStageConfig, whole_step_warmup


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def changed(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("warmup", "steps", "ours", "transformers_"),
    [(0.1, 1, 0, 1), (0.1, 2, 0, 1), (0.1, 9, 0, 1), (0.1, 10, 1, 1), (0.1, 25, 2, 3), (0.5, 2, 1, 1), (3, 2, 1, 3),
     (0, 5, 0, 0), (2, 10, 2, 2)],
)  # fmt: skip
def test_warmup_rounds_down_and_leaves_a_full_rate_step(warmup, steps, ours, transformers_):
    # transformers' own count, for contrast: ceil(ratio * steps), which can cover every step of a short round
    assert TrainingArguments(output_dir="x", warmup_steps=warmup).get_warmup_steps(steps) == transformers_
    assert whole_step_warmup(warmup, steps) == ours
    assert ours <= max(steps - 1, 0)
    cream = CreamConfig(output_dir="x", warmup_steps=warmup, use_cpu=True, report_to="none")
    sft = SFTStageConfig(output_dir="x", warmup_steps=warmup, use_cpu=True, report_to="none")
    assert cream.get_warmup_steps(steps) == sft.get_warmup_steps(steps) == ours


def read_tensorboard(folder: Path) -> dict[str, list[int]]:
    """Every scalar tag's steps, in the order they were written (all event files of the folder, by write time)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars":
                    events.append((event.wall_time, event.step, value.tag))
    steps: dict[str, list[int]] = defaultdict(list)
    for _, step, tag in sorted(events, key=lambda e: e[0]):
        steps[tag].append(step)
    return steps


def test_readme_quickstart_on_10_prompts_trains_every_round_and_logs_one_run(tmp_path, m0, tokenizer, capsys,
                                                                           monkeypatch):  # fmt: skip
    """The README quickstart's CreamConfig (defaults: lr 1e-6, warmup_steps 0.1, batch 8) on 10 prompts: one
    optimizer step per round. Before the whole-step warm-up that step ran at lr 0 and M2 == M1."""
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working folder (TensorBoard used ./runs)
    questions = [*QUESTIONS, "Name a colour.", "What is 2 times 5?"]
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    seed_sft = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": q}] for q in questions[:4]],
         "completion": [[{"role": "assistant", "content": a}] for a in ("7.", "A cat.", "Clouds.", "Light.")]}
    )  # fmt: skip
    out = tmp_path / "out"
    args = CreamConfig(
        output_dir=str(out), num_iterations=2, num_generations=5, temperature=0.8, top_p=0.95, beta=0.1,
        consistency_measure="kendall", consistency_granularity="dataset",  # the README's line, then speed only:
        max_new_tokens=8, max_length=128, use_cpu=True, report_to="tensorboard", logging_steps=1,
    )  # fmt: skip
    assert (args.learning_rate, args.warmup_steps, args.per_device_train_batch_size) == (1e-6, 0.1, 8)
    trainer = CreamTrainer(
        model=m0, args=args, train_dataset=prompts, sft_dataset=seed_sft, processing_class=tokenizer
    )
    output = trainer.train()

    rounds = output.metrics["rounds"]
    assert [r["train_steps"] for r in rounds] == [1, 1]
    for t in (1, 2):
        assert changed(out / f"M{t}", out / f"M{t + 1}"), f"round {t} left the weights unchanged"
        assert "no_op" not in rounds[t - 1]
    captured = capsys.readouterr()
    printed = captured.out
    assert "round 1: sampling" in captured.err  # progress bars on by default (disable_tqdm=False)
    for t in (1, 2):
        line = next(x for x in printed.splitlines() if x.startswith(f"CREAM round {t}/2: C "))
        assert line == round_line(rounds[t - 1], 2) and "pairs" in line and "train " in line

    # One TensorBoard run, under output_dir, none in the working folder or under output_dir/sft.
    event_folders = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    assert len(event_folders) == 1 and next(iter(event_folders)).parent == out / "runs", event_folders
    steps = read_tensorboard(next(iter(event_folders)))
    sft_steps = output.metrics["sft"]["sft_steps"]
    assert steps["train/sft/loss"] == list(range(1, sft_steps + 1))
    # every metric's steps increase; epoch / cream/round are logged twice at a stage's last step by transformers
    # itself (with that step and with the end-of-training summary)
    for tag, seen in steps.items():
        if tag.endswith(("/epoch", "cream/round")):
            assert seen == sorted(seen), (tag, seen)
        else:
            assert all(a < b for a, b in zip(seen, seen[1:])), (tag, seen)
    # a round's own metrics sit at its first training step: S + 1, then S + 1 + round 1's steps
    starts = [sft_steps + 1, sft_steps + 1 + rounds[0]["train_steps"]]
    for tag in ("train/cream/consistency", "train/cream/kendall_tau_mean", "train/cream/num_pairs",
                "train/cream/time_train_s"):  # fmt: skip
        assert steps[tag] == starts, (tag, steps[tag])
    assert steps["train/loss"] == starts  # one step per round, right there


def test_a_round_that_learns_nothing_is_flagged_once(tmp_path, m0, tokenizer, prompts, caplog, capsys, monkeypatch):
    # transformers' own warm-up count (ceil) on a one-step round: that step runs at learning rate 0, as before the fix
    monkeypatch.setattr(CreamConfig, "get_warmup_steps", TrainingArguments.get_warmup_steps)
    args = cream_args(tmp_path, num_iterations=1, warmup_steps=0.1, per_device_train_batch_size=8)
    trainer = CreamTrainer(model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts,
                           processing_class=tokenizer)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_cream"):
        output = trainer.train()
    assert "sampling" not in capsys.readouterr().err  # disable_tqdm=True: no sampling/scoring bar either
    (metrics,) = output.metrics["rounds"]
    assert metrics["train_steps"] == 1 and "learning rate 0" in metrics["no_op"]
    assert not changed(tmp_path / "M1", tmp_path / "M2")  # the flag is right: nothing moved
    saved = json.loads((tmp_path / "rounds" / "round_1" / "metrics.json").read_text())
    assert saved["no_op"] == metrics["no_op"]
    warnings = [r for r in caplog.records if "learnt nothing" in r.getMessage()]
    assert len(warnings) == 1 and "round 1" in warnings[0].getMessage()
    card = (tmp_path / "M2" / "README.md").read_text()
    assert "Round 1 learnt nothing: all" in card
    # metrics.json: each timing once, floats to 6 significant digits
    assert "timings_s" not in saved and sum(k.startswith("time_") for k in saved) == 5
    floats = [v for v in saved.values() if isinstance(v, float)]
    assert floats and all(float(f"{v:.6g}") == v for v in floats)


def test_no_op_reasons():
    probe = LearningRateProbe()
    assert "tied" in no_op_reason({"num_pairs": 0, "num_tied_skipped": 4, "train_steps": 0})
    assert "0 optimizer steps" in no_op_reason({"num_pairs": 3, "train_steps": 0})
    assert no_op_reason({"num_pairs": 3, "train_steps": 1}, probe) is None  # nothing recorded: not flagged
    group = {"lr": 0.0}
    probe.on_optimizer_step(None, None, None, optimizer=type("O", (), {"param_groups": [group]})())
    assert "learning rate 0" in no_op_reason({"num_pairs": 3, "train_steps": 1}, probe)
    group["lr"] = 1e-6
    probe.on_optimizer_step(None, None, None, optimizer=type("O", (), {"param_groups": [group]})())
    assert no_op_reason({"num_pairs": 3, "train_steps": 2}, probe) is None
    assert tidy({"a": 0.1 + 0.2, "b": [1 / 3], "c": 3}) == {"a": 0.3, "b": [0.333333], "c": 3}
