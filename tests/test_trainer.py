"""CreamTrainer end to end on a tiny Llama: full fine-tuning, LoRA, reference handling, GA, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LORA, QUESTIONS, cream_args, lora_m1, perturbed, tiny_llama
from datasets import Dataset, load_from_disk
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.core.labelling import label_round
from trl_cream.modeling.adapters import PREVIOUS_ADAPTER
from trl_cream.modeling.sampling import tokenize_prompts
from trl_cream.runs.tables import pairs_dataset


def weights(path: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (path / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(path / name))


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def check_run(out: Path, num_prompts: int, n: int, log_history: list[dict]) -> list[dict]:
    for m in ("M1", "M2", "M3"):
        assert (out / m).is_dir(), f"{m} was not saved"
    all_metrics = []
    for t in (1, 2):
        rd = out / "rounds" / f"round_{t}"
        candidates, pairs = load_from_disk(str(rd / "candidates")), load_from_disk(str(rd / "pairs"))
        metrics = json.loads((rd / "metrics.json").read_text())
        # Every pair starts at z = 0 (policy = reference); with C = 0.5 on every pair dL/dz = (1 - C)σ(z) - Cσ(-z)
        # vanishes there, so the round's first gradient is zero in exact arithmetic. On a real CPU the training
        # forward and the scoring forward take different kernels (different batch shapes) and differ by ~1e-6 in a
        # log-prob, which AdamW can still turn into an lr-sized step; so the weights are not compared bitwise: the
        # first gradient norm is, against a bound far below a round with signal (~1 on this model).
        no_signal = set(pairs["consistency"]) == {0.5}
        grad_norms = [e["grad_norm"] for e in log_history if "grad_norm" in e and e.get("cream/round") == t]
        assert grad_norms, f"round {t} logged no training step"
        if no_signal:
            assert grad_norms[0] < 1e-3, (t, grad_norms)
        else:
            assert grad_norms[0] > 1e-2, (t, grad_norms)
            assert differ(weights(out / f"M{t}"), weights(out / f"M{t + 1}")), (t, metrics["consistency"])
        assert len(candidates) == (num_prompts // 2) * n
        assert (
            metrics["num_pairs"] == len(pairs)
            and metrics["num_pairs"] + metrics["num_tied_skipped"] == num_prompts // 2
        )
        assert 0 <= metrics["consistency"] <= 1 and -1 <= metrics["kendall_tau_mean"] <= 1
        assert -1 <= metrics["spearman_mean"] <= 1 and 0 <= metrics["toporder_mean"] <= 1
        assert 0 <= metrics["frac_tau_negative"] <= 1
        finite = [v for k, v in metrics.items() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in finite)
        timings = {k for k in metrics if k.startswith("time")}  # each phase's timing once, no nested copy
        assert timings == {f"time_{p}_s" for p in ("generate", "score", "pair", "train", "save")}, sorted(metrics)
        assert metrics["reused_phases"] == [] and "no_op" not in metrics
        assert all(r >= 1 for r in candidates["rank"]) and all(r <= n for r in candidates["rank"])
        prev = candidates["logp_previous"]
        assert (all(p is None for p in prev)) if t == 1 else all(p is not None for p in prev)
        all_metrics.append(metrics)
    return all_metrics


def test_two_rounds_full_finetuning(finished_full_run, tmp_path, m0, tokenizer, prompts):
    run = finished_full_run
    metrics = check_run(run.out, len(QUESTIONS), run.args.num_generations, run.log_history)
    assert [r["round"] for r in run.output.metrics["rounds"]] == [1, 2]
    logged = [e for e in run.log_history if "cream/kendall_tau_mean" in e]
    assert len(logged) == 2 and logged[0]["cream/kendall_tau_mean"] == pytest.approx(metrics[0]["kendall_tau_mean"])
    assert any("loss" in e and "rewards/margins" in e and "cream/batch_consistency" in e for e in run.log_history)

    # Same seed, fresh models: identical pairs.
    again = CreamTrainer(
        model=perturbed(m0),
        ref_model=m0,
        args=cream_args(tmp_path / "b"),
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    again.train()
    for t in (1, 2):
        a = load_from_disk(str(run.out / "rounds" / f"round_{t}" / "pairs"))
        b = load_from_disk(str(tmp_path / "b" / "rounds" / f"round_{t}" / "pairs"))
        assert a["chosen_input_ids"] == b["chosen_input_ids"] and a["rejected_input_ids"] == b["rejected_input_ids"]


def test_two_rounds_lora_shares_the_base_and_trains_only_the_policy_adapter(tmp_path, m0, tokenizer, prompts):
    base_ptrs = {n: p.data_ptr() for n, p in m0.named_parameters()}
    model = lora_m1(m0)
    trainer = CreamTrainer(model=model, args=cream_args(tmp_path), train_dataset=prompts, processing_class=tokenizer)
    assert trainer.ref_model is None
    trainer.train()
    check_run(tmp_path, len(QUESTIONS), 3, trainer.state.log_history)
    # Same seed, fresh adapter: identical pairs.
    again = tmp_path / "again"
    CreamTrainer(
        model=lora_m1(tiny_llama(tokenizer)), args=cream_args(again), train_dataset=prompts, processing_class=tokenizer
    ).train()
    for t in (1, 2):
        a = load_from_disk(str(tmp_path / "rounds" / f"round_{t}" / "pairs"))
        b = load_from_disk(str(again / "rounds" / f"round_{t}" / "pairs"))
        assert a["chosen_input_ids"] == b["chosen_input_ids"] and a["rejected_input_ids"] == b["rejected_input_ids"]
    assert PREVIOUS_ADAPTER in model.peft_config
    assert not (tmp_path / "M3" / PREVIOUS_ADAPTER).exists()  # only the policy adapter is saved
    # No base weight was copied: every base parameter is the same storage as in M0.
    for name, param in model.named_parameters():
        if "lora_" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert param.data_ptr() == base_ptrs[base_name], name
    # Gradients reach only the policy adapter.
    pairs = load_from_disk(str(tmp_path / "rounds" / "round_2" / "pairs"))
    batch = trainer.data_collator([pairs[0], pairs[1]])
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".default." in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{PREVIOUS_ADAPTER}." in n)


def test_first_step_of_a_round_has_loss_log2_for_every_pair(tmp_path, m0, tokenizer, prompts):
    for granularity in ("dataset", "sample"):
        args = cream_args(tmp_path / granularity, consistency_granularity=granularity)
        trainer = CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
        )
        shard = trainer.split_prompts()[0]
        prompt_ids = tokenize_prompts(tokenizer, shard)
        candidates = trainer.generate_candidates(prompt_ids)
        scores = trainer.score_round(1, prompt_ids, candidates)
        labels = label_round(scores, args.consistency_measure, args.consistency_granularity)
        pairs = pairs_dataset(1, prompt_ids, candidates, scores, labels, args.ref_policy)
        assert len(pairs) > 0
        trainer.model.eval()
        for row in pairs:
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, trainer.data_collator([row])).item()
            assert loss == pytest.approx(math.log(2), abs=1e-5)


def test_per_sample_consistency_reaches_each_pair_of_its_own_prompt(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path, consistency_granularity="sample", num_generations=4)
    CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    ).train()
    for t in (1, 2):
        rd = tmp_path / "rounds" / f"round_{t}"
        candidates, pairs = load_from_disk(str(rd / "candidates")), load_from_disk(str(rd / "pairs"))
        c_of_prompt = {row["prompt_index"]: row["consistency"] for row in candidates}
        assert pairs["consistency"] == [c_of_prompt[j] for j in pairs["prompt_index"]]


def test_srlm_baseline_and_beta_per_round(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path, consistency_measure="none", beta=[0.1, 0.3])
    out = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    ).train()
    assert [r["beta"] for r in out.metrics["rounds"]] == [0.1, 0.3]
    for t in (1, 2):
        pairs = load_from_disk(str(tmp_path / "rounds" / f"round_{t}" / "pairs"))
        assert set(pairs["consistency"]) == {1.0}


def _one_step_update(
    tmp_path: Path, m0, tokenizer, prompts, pairs: Dataset, bs: int, ga: int
) -> dict[str, torch.Tensor]:
    model = perturbed(m0)
    args = cream_args(
        tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0,
    )  # fmt: skip
    trainer = CreamTrainer(model=model, ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_on_pairs(pairs)
    assert trainer.state.global_step == 1
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # = lr * gradient


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path / "pairs")
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    prompt_ids = tokenize_prompts(tokenizer, trainer.split_prompts()[0][:2])
    candidates = trainer.generate_candidates(prompt_ids)
    scores = trainer.score_round(1, prompt_ids, candidates)
    labels = label_round(scores, "kendall", "sample")
    pairs = pairs_dataset(1, prompt_ids, candidates, scores, labels, "initial")  # policy != reference: non-zero grads
    assert len(pairs) == 2
    big = _one_step_update(tmp_path / "big", m0, tokenizer, prompts, pairs, bs=2, ga=1)
    accumulated = _one_step_update(tmp_path / "ga", m0, tokenizer, prompts, pairs, bs=1, ga=2)
    assert max(v.abs().max().item() for v in big.values()) > 1e-6
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_generations": 1}, "num_generations=1"),
        ({"consistency_measure": "pearson"}, "consistency_measure='pearson' is unknown"),
        ({"consistency_granularity": "batch"}, "consistency_granularity='batch' is unknown"),
        ({"ref_policy": "previous"}, "ref_policy='previous' is unknown"),
        ({"beta": [0.1, 0.2, 0.3]}, "one per round"),
        ({"generation_backend": "sglang"}, "generation_backend='sglang' is unknown"),
        ({"generation_backend": "paged", "repetition_penalty": 1.2}, "not supported by generation_backend='paged'"),
    ],
)
def test_config_is_validated_up_front(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cream_args(tmp_path, **overrides)


def test_bad_inputs_fail_before_any_work(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path)
    m1 = perturbed(m0)
    with pytest.raises(ValueError, match="needs a `prompt` column"):
        CreamTrainer(
            model=m1,
            ref_model=m0,
            args=args,
            train_dataset=prompts.rename_column("prompt", "q"),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="num_iterations=2 is larger than the number of prompts \\(1\\)"):
        CreamTrainer(model=m1, ref_model=m0, args=args, train_dataset=prompts.select([0]), processing_class=tokenizer)
    with pytest.raises(ValueError, match="identical to the initial model"):
        CreamTrainer(
            model=perturbed(m0, scale=0.0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
        )
    with pytest.raises(ValueError, match="identical to the initial model"):
        CreamTrainer(
            model=get_peft_model(m0, LoraConfig(**LORA)), args=args, train_dataset=prompts, processing_class=tokenizer
        )
    with pytest.raises(ValueError, match="needs the initial model"):
        CreamTrainer(model=m1, args=args, train_dataset=prompts, processing_class=tokenizer)
    with pytest.raises(TypeError, match="CreamConfig"):
        CreamTrainer(model=m1, ref_model=m0, args=None, train_dataset=prompts, processing_class=tokenizer)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_config_defaults_follow_the_paper(tmp_path):
    args = CreamConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.num_generations, args.temperature, args.top_p, args.beta) == (5, 0.8, 0.95, 0.1)
    assert (args.learning_rate, args.num_train_epochs, args.warmup_steps) == (1e-6, 1.0, 0.1)
    assert (args.max_new_tokens, args.max_length) == (768, 1536)  # the authors' code samples up to 768 tokens
    assert (args.top_k, args.min_p, args.repetition_penalty, args.generation_backend) == (0, None, 1.0, "generate")
    assert (args.consistency_measure, args.consistency_granularity, args.ref_policy) == (
        "kendall",
        "dataset",
        "round_start",
    )


def test_a_named_policy_adapter_is_saved_at_the_top_of_each_iteration(tmp_path, m0, tokenizer, prompts):
    model = get_peft_model(m0, LoraConfig(**LORA), adapter_name="policy")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    args = cream_args(tmp_path, num_iterations=1)
    CreamTrainer(model=model, args=args, train_dataset=prompts, processing_class=tokenizer).train()
    for m in ("M1", "M2"):
        assert (tmp_path / m / "adapter_config.json").exists() and not (tmp_path / m / "policy").exists()


def test_run_ending_integrations_are_wrapped_not_monkeypatched_and_end_once():
    """`run_log.attach` holds a tracker's ``on_train_end`` back until the run ends, through a `TrainerCallback` that
    wraps it (every other event is passed on), instead of replacing methods on the tracker object."""
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    from trl_cream.trainer import run_log

    calls: list[str] = []

    class TrackioCallback(TrainerCallback):  # the name is what marks a run-ending integration
        def on_log(self, args, state, control, **kwargs):
            calls.append("log")

        def on_train_end(self, args, state, control, **kwargs):
            calls.append("end")

    tracker, other = TrackioCallback(), TrainerCallback()
    handler = CallbackHandler([tracker, other], None, None, None, None)
    run_log.attach(handler, "/tmp/unused")
    assert "on_train_end" not in vars(tracker) and handler.callbacks[1] is other
    (wrapped,) = [c for c in handler.callbacks if isinstance(c, run_log.RunEndDeferred)]
    assert wrapped.integration is tracker
    args, state, control = TrainingArguments("/tmp/unused", report_to="none"), TrainerState(), TrainerControl()
    for _ in range(2):  # two rounds: logs pass, their ends do not
        handler.on_log(args, state, control, logs={"loss": 1.0})
        handler.on_train_end(args, state, control)
    assert calls == ["log", "log"]
    run_log.end_run(handler, args, state, control)
    assert calls == ["log", "log", "end"]
