"""The bad-input table of docs/troubleshooting.md: every case is refused with what was wrong, the offending value and
what to do, before any sampling, scoring or training, and without writing anything into `output_dir`."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from trl_cream import CreamTrainer
from trl_cream.artifacts import RoundScores

CHAT = [[{"role": "user", "content": q}] for q in QUESTIONS]


def chat_prompts(rows: list | None = None) -> Dataset:
    return Dataset.from_dict({"prompt": CHAT if rows is None else rows})


# ---------------------------------------------------------------- CreamConfig: refused when the config is built
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_generations", 1, r"num_generations=1: .*at least 2 per prompt"),
        ("num_iterations", 0, r"num_iterations=0: run at least one CREAM round"),
        ("consistency_measure", "pearson", r"consistency_measure='pearson' is unknown; choose one of kendall"),
        ("consistency_granularity", "token", r"consistency_granularity='token' is unknown; choose one of dataset"),
        ("ref_policy", "latest", r"ref_policy='latest' is unknown; choose one of round_start, initial"),
        ("long_prompts", "drop", r"long_prompts='drop' is unknown; choose one of truncate, error"),
    ],
)
def test_bad_config_values_are_refused_when_the_config_is_built(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        cream_args(tmp_path / "out", **{field: value})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the trainer: refused at construction
def _no_eos_no_pad(tokenizer):
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    return tokenizer


def _no_chat_template(tokenizer):
    tokenizer.chat_template = None
    return tokenizer


CASES = {
    "missing prompt column": (
        dict(dataset=Dataset.from_dict({"question": QUESTIONS})),
        r"needs a `prompt` column .*\['question'\].*rename_column",
    ),
    "empty dataset": (dict(dataset=Dataset.from_dict({"prompt": []})), r"`train_dataset` is empty"),
    "a round with no prompts": (
        dict(args=dict(num_iterations=len(QUESTIONS) + 1)),
        rf"num_iterations={len(QUESTIONS) + 1} is larger than the number of prompts \({len(QUESTIONS)}\)",
    ),
    "an empty prompt": (
        dict(dataset=chat_prompts([*CHAT[:3], [], *CHAT[4:]])),
        r"1 empty prompt\(s\) .*rows \[3\].*filter",
    ),
    "prompt longer than max_length (error)": (
        dict(args=dict(max_length=20, max_new_tokens=8, long_prompts="error")),
        r"longer than max_length - max_new_tokens = 20 - 8 = 12 tokens.*long_prompts='truncate'",
    ),
    "max_length leaves no room": (
        dict(args=dict(max_length=8, max_new_tokens=8)),
        r"max_length=8 leaves no room for a prompt after max_new_tokens=8",
    ),
    "chat prompts without a chat template": (
        dict(tokenizer=_no_chat_template),
        r"chat messages \(e.g. row 0\) but the tokenizer has no chat template",
    ),
    "no pad and no eos token": (dict(tokenizer=_no_eos_no_pad), r"neither a pad nor an eos token.*pad_token"),
    "policy identical to pi_0 (every candidate tied)": (
        dict(model="same"),
        r"identical to the initial model π_0.*every candidate is tied.*Every parameter",
    ),
    "model given as an id": (dict(model="id"), r"not a model id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_before_any_work(tmp_path, m0, tokenizer, case):
    spec, message = CASES[case]
    out = tmp_path / "out"
    args = cream_args(out, **spec.get("args", {}))
    tokenizer = spec.get("tokenizer", lambda t: t)(tokenizer)
    model = {"same": copy.deepcopy(m0), "id": "org/model"}.get(spec.get("model"), perturbed(m0))
    with pytest.raises((ValueError, TypeError), match=message):
        CreamTrainer(
            model=model,
            ref_model=m0,
            args=args,
            train_dataset=spec.get("dataset", chat_prompts()),
            processing_class=tokenizer,
        )
    assert not out.exists()  # nothing half-written


def test_peft_config_with_a_model_that_is_already_a_peft_model_is_refused(tmp_path, m0, tokenizer):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"already a PeftModel \(adapters \['default'\]\).*peft_config=None"):
        CreamTrainer(
            model=get_peft_model(m0, lora),
            args=cream_args(tmp_path / "out"),
            train_dataset=chat_prompts(),
            processing_class=tokenizer,
            peft_config=lora,
        )
    assert not (tmp_path / "out").exists()


def test_long_prompts_are_truncated_with_a_warning(tmp_path, m0, tokenizer, caplog):
    args = cream_args(tmp_path / "out", max_length=20, max_new_tokens=8, num_iterations=1)
    with caplog.at_level(logging.WARNING, logger="trl_cream.validation"):
        trainer = CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=args, train_dataset=chat_prompts(), processing_class=tokenizer
        )
    assert "longer than max_length - max_new_tokens = 12 tokens" in caplog.text
    prompt_ids = trainer.sample_phase(1, [CHAT[0]]).prompt_ids  # what round 1 samples from: the last 12 tokens
    full = tokenizer.apply_chat_template(CHAT[0], add_generation_prompt=True, tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert len(full) > 12 and prompt_ids == [list(full[-12:])]


# ---------------------------------------------------------------- refused inside a round, before the results are saved
class _ScoresOverride(CreamTrainer):
    """Replaces round 1's π_t log-probs: NaN at one candidate, or equal to π_0's (every candidate tied)."""

    mode = "nan"

    def score_round(self, t, prompt_ids, candidates):
        scores = super().score_round(t, prompt_ids, candidates)
        policy = scores.initial.clone() if self.mode == "tied" else scores.policy.clone()
        if self.mode == "nan":
            policy[1, 0] = float("nan")
        return RoundScores(policy=policy, initial=scores.initial, previous=scores.previous, lengths=scores.lengths)


def _override_trainer(out: Path, m0, tokenizer, mode: str) -> _ScoresOverride:
    args = cream_args(out, num_iterations=1, save_round_artifacts=False)
    trainer = _ScoresOverride(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=chat_prompts(), processing_class=tokenizer
    )
    trainer.mode = mode
    return trainer


def test_nan_log_probs_are_refused_before_scores_or_pairs_are_saved(tmp_path, m0, tokenizer):
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"Round 1: 1 candidate log-probs under π_t \(M1\) are NaN or inf.*"):
        _override_trainer(out, m0, tokenizer, "nan").train()
    round_1 = out / "rounds" / "round_1"
    assert (round_1 / "samples").is_dir()  # the finished phase is kept for a resume
    assert not (round_1 / "scores.safetensors").exists() and not (round_1 / "pairs").exists()
    assert not (out / "M2").exists()


def test_a_round_where_every_candidate_is_tied_warns_and_keeps_the_policy(tmp_path, m0, tokenizer, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="trl_cream.cream_trainer"):
        output = _override_trainer(out, m0, tokenizer, "tied").train()
    assert "Round 1 produced no preference pair: every prompt's candidates are tied" in caplog.text
    assert output.metrics["rounds"][0]["num_pairs"] == 0
    m1, m2 = load_file(str(out / "M1" / "model.safetensors")), load_file(str(out / "M2" / "model.safetensors"))
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)


# ---------------------------------------------------------------- security
class _Loaded(Exception):
    pass


@pytest.mark.parametrize(("flag", "expected"), [([], False), (["--trust_remote_code", "true"], True)])
def test_the_cli_runs_no_remote_code_unless_asked(tmp_path, monkeypatch, flag, expected):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_cream import cli

    seen: dict[str, object] = {}

    def fake_model(name, **kwargs):
        seen["model"] = kwargs.get("trust_remote_code")
        return object()

    def fake_tokenizer(name, **kwargs):
        seen["tokenizer"] = kwargs.get("trust_remote_code")
        raise _Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "ho"}\n')
    argv = [
        "train",
        "--model_name_or_path",
        "org/model",
        "--dataset_name",
        str(prompts),
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(_Loaded):
        cli.main([*argv, "--use_cpu", "--bf16", "false", *flag])
    assert seen == {"model": expected, "tokenizer": expected}
