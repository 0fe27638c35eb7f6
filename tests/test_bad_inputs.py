"""The bad-input table of docs/troubleshooting.md: every case is refused with what was wrong, the offending value and
what to do, before any sampling, scoring or training, and without writing anything into `output_dir`."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from trl_cream import CreamTrainer
from trl_cream.core.labelling import RoundScores
from trl_cream.trainer.phases import RoundState

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
        ("temperature", 0.0, r"temperature=0.0 must be > 0 to sample candidates"),
        ("temperature", -1.0, r"temperature=-1.0 must be > 0"),
        ("top_p", 0.0, r"top_p=0.0 must lie in \(0, 1\]"),
        ("top_p", 1.5, r"top_p=1.5 must lie in \(0, 1\].*1.0 turns nucleus sampling off"),
        ("top_k", -1, r"top_k=-1 must be >= 0 \(0 turns top-k filtering off\)"),
        ("generation_kwargs", {"do_sample": False}, r"'do_sample': False.*identical candidates.*Drop do_sample"),
        ("generation_kwargs", {"temprature": 0.7}, r"'temprature' \(did you mean 'temperature'\?\).*ignored"),
        ("generation_kwargs", {"top_p": 1.5}, r"^generation_kwargs: top_p=1.5 must lie in"),
        ("learning_rate", -1e-5, r"learning_rate=-1e-05 must be > 0 \(the paper uses 1e-6"),
        ("per_device_train_batch_size", 0, r"per_device_train_batch_size=0 must be at least 1"),
        ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps=0 must be at least 1"),
        ("num_train_epochs", 0, r"num_train_epochs=0: .*M<t\+1> would equal M<t>.*num_train_epochs > 0"),
        ("hub_model_id", "bad repo id!!", r"hub_model_id='bad repo id!!' is not a valid Hub repo id.*'<user or org>/"),
        ("max_length", None, r"max_length=None: CREAM truncates prompts.*Set max_length"),
    ],
)
def test_bad_config_values_are_refused_when_the_config_is_built(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        cream_args(tmp_path / "out", **{field: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value", "instead"),
    [
        ("missing_eos_penalty", 1.0, "max_new_tokens"),
        ("cache_implementation", "static", "generation_kwargs"),
        ("reward_model_path", "org/rm", "reward_source='reward_model'"),
        ("reward_weights", [1.0], "reward_source"),
        ("model_init_kwargs", {"dtype": "float32"}, "from_pretrained"),
        ("vllm_mode", "server", "generation_backend"),
        ("vllm_gpu_memory_utilization", 0.9, "generation_backend"),
    ],
)
def test_inherited_fields_cream_ignores_are_refused_when_set(tmp_path, field, value, instead):
    with pytest.raises(ValueError, match=rf"{field}=.*CREAM does not use.*{instead}.*Leave {field} at its default"):
        cream_args(tmp_path / "out", **{field: value})
    assert not (tmp_path / "out").exists()


def test_inherited_fields_cream_ignores_are_accepted_at_their_default(tmp_path):
    args = cream_args(tmp_path, missing_eos_penalty=None, vllm_mode="colocate", reward_weights=None)
    assert args.missing_eos_penalty is None and args.vllm_mode == "colocate"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top_p", "1.5"], r"top_p=1.5 must lie in"),
        (["--learning_rate", "-1"], r"learning_rate=-1.0 must be > 0"),
        (["--push_to_hub", "--hub_model_id", "bad repo id!!"], r"not a valid Hub repo id"),
        (["--max_prompts", "-3"], r"--max_prompts -3: give a positive number of prompts"),
    ],
)
def test_the_cli_parser_refuses_the_same_values(tmp_path, capsys, flags, message):
    from trl_cream.cli import train_parser

    with pytest.raises(SystemExit) as exit_info:  # argparse's `prog: error: <the config's message>`, status 2
        train_parser().parse_args_and_config(["--output_dir", str(tmp_path / "out"), "--use_cpu", *flags])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_yaml_value_of_the_wrong_type_is_named(tmp_path, capsys):
    from trl_cream.cli import train_parser

    config = tmp_path / "config.yaml"
    config.write_text("beta: [0.1, oops]\nnum_iterations: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        train_parser().parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "beta=[0.1, 'oops']: every β must be a number" in capsys.readouterr().err


def test_a_hub_model_id_without_a_namespace_is_refused_before_any_training(tmp_path):
    with pytest.raises(ValueError, match=r"hub_model_id='cream' has no namespace.*Use e.g. 'your-name/cream'"):
        cream_args(tmp_path / "out", push_to_hub=True, hub_model_id="cream")


def test_repo_ids_derived_from_hub_model_id_are_checked_too(tmp_path):
    long_name = "org/" + "n" * 94  # a valid name of 94 characters; "-M3" makes it 97, past the Hub's limit of 96
    cream_args(tmp_path / "a", hub_model_id=long_name)
    with pytest.raises(ValueError, match=r"not a valid Hub repo id \('org/n+-M3'"):
        cream_args(tmp_path / "b", hub_model_id=long_name, hub_iteration_strategy="repo")


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
    with caplog.at_level(logging.WARNING, logger="trl_cream.trainer.validation"):
        trainer = CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=args, train_dataset=chat_prompts(), processing_class=tokenizer
        )
    assert "longer than max_length - max_new_tokens = 12 tokens" in caplog.text
    prompt_ids = trainer.sample_phase(
        RoundState(1), [CHAT[0]]
    ).prompt_ids  # what round 1 samples from: the last 12 tokens
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
    with caplog.at_level(logging.WARNING, logger="trl_cream"):
        output = _override_trainer(out, m0, tokenizer, "tied").train()
    warnings = [r.getMessage() for r in caplog.records if "learnt nothing" in r.getMessage()]
    assert len(warnings) == 1 and "round 1" in warnings[0] and "candidates are tied" in warnings[0], caplog.text
    assert output.metrics["rounds"][0]["num_pairs"] == 0 and "tied" in output.metrics["rounds"][0]["no_op"]
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


# ---------------------------------------------------------------- models, tokenizer and prompt rows (issue 17)
def tree(folder: Path) -> dict[str, str]:
    """``relative path → SHA-256`` of every file under ``folder``: byte-identical before and after, or not."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_folder(out: Path) -> dict[str, str]:
    """An output_dir that already holds the user's own files (an M0/ of theirs, notes)."""
    (out / "M0").mkdir(parents=True)
    (out / "M0" / "weights.bin").write_bytes(b"the user's own M0")
    (out / "notes.txt").write_text("keep me")
    return tree(out)


def _gpt2(m0):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=m0.config.vocab_size, n_embd=32, n_layer=1, n_head=2))


def _smaller_vocab(model):
    model.resize_token_embeddings(300)
    return model


def _short_context(model):
    model.config.max_position_embeddings = 20
    return model


def _pad_but_no_eos(tokenizer):
    tokenizer.eos_token = None
    assert tokenizer.pad_token is not None
    return tokenizer


def _rows(rows: list) -> Dataset:
    return Dataset.from_dict({"prompt": rows})


class _Columns(dict):
    """A dataset-like table by column (what `validate_prompts` accepts besides `datasets.Dataset`); unlike Arrow, it
    can hold text that is not valid UTF-8."""

    column_names = property(lambda self: list(self))
    __len__ = lambda self: len(self["prompt"])  # noqa: E731


def _wider(model):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size = 64, 128
    return LlamaForCausalLM(config)


MODEL_AND_DATA_CASES = {
    "whitespace-only prompt": (
        dict(dataset=lambda: _rows(["  \n ", *QUESTIONS[1:]])),
        r"row 0: .* is only whitespace",
    ),
    "non-string prompt": (dict(dataset=lambda: _rows(list(range(8)))), r"row 0: the prompt 0 is a int.*strings"),
    "prompt as a list of strings": (
        dict(dataset=lambda: _rows([q.split() for q in QUESTIONS])),
        r"row 0: .* is a list of strings, which would be tokenized as pre-split words; join it",
    ),
    "messages without role": (
        dict(dataset=lambda: _rows([[{"content": q}] for q in QUESTIONS])),
        r"row 0: .*message 0 without a string 'role'.*needs 'role'",
    ),
    "content None": (
        dict(dataset=lambda: _rows([*CHAT[:2], [{"role": "user", "content": None}], *CHAT[3:]])),
        r"row 2: .*message 0 with content=None; every message needs a string 'content'",
    ),
    "content parts": (
        dict(dataset=lambda: _rows([[{"role": "user", "content": [{"type": "text", "text": q}]}] for q in QUESTIONS])),
        r"row 0: .*content is a list of parts; give the text as one string",
    ),
    "a DatasetDict": (
        dict(dataset=lambda: __import__("datasets").DatasetDict({"train": chat_prompts()})),
        r"is a DatasetDict with splits \['train'\]; pass one split, e.g. train_dataset=dataset\['train'\]",
    ),
    "an IterableDataset": (
        dict(dataset=lambda: chat_prompts().to_iterable_dataset()),
        r"is an IterableDataset \(streaming\).*Dataset.from_list\(list\(iterable_dataset\)\)",
    ),
    "a plain list of dicts": (
        dict(dataset=lambda: [{"prompt": q} for q in QUESTIONS]),
        r"`train_dataset` is a plain list of 8 rows; CREAM takes a `datasets.Dataset`.*Dataset.from_list\(rows\)",
    ),
    "a prompt that is not valid UTF-8": (
        dict(dataset=lambda: _Columns(prompt=[*QUESTIONS[:5], "caf\udce9?", *QUESTIONS[6:]])),
        r"row 5: the prompt .* is not valid UTF-8 \(character 3 is '\\udce9', a lone surrogate\)",
    ),
    "a chat prompt with only a system message": (
        dict(dataset=lambda: _rows([*CHAT[:1], [{"role": "system", "content": "Be brief."}], *CHAT[2:]])),
        r"row 1: .*has only system message\(s\): there is no question.*'role': 'user'",
    ),
    "a pi_0 of another width": (
        dict(ref=_wider),
        r"`ref_model` \(π_0\) is another architecture than `model`: model.embed_tokens.weight is \[384, 64\] in π_0 "
        r"but \[384, 32\] in the policy",
    ),
    "pad token but no eos": (
        dict(tokenizer=_pad_but_no_eos),
        r"pad token \('<\|im_end\|>'\) but no eos token.*eos_token =",
    ),
    "GPT-2 ref_model against a Llama policy": (
        dict(ref=_gpt2),
        r"`ref_model` \(π_0\) is a 'gpt2' model but `model` is a 'llama' model.*Pass M0 as ref_model",
    ),
    "ref_model with a smaller vocabulary": (
        dict(ref=_smaller_vocab),
        r"`ref_model` \(π_0\) embeds 300 tokens but `model` embeds 384",
    ),
    "model vocabulary smaller than the tokenizer's": (
        dict(model=_smaller_vocab, ref=_smaller_vocab),
        r"tokenizer has 384 tokens but `model` embeds only 300.*resize_token_embeddings",
    ),
    "prompts past max_position_embeddings": (
        dict(model=_short_context),
        r"max_new_tokens=8 its candidates reach \d+ positions, past the model's max_position_embeddings=20.*"
        r"max_length <= 20",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_AND_DATA_CASES))
def test_bad_models_tokenizers_and_prompt_rows_are_refused_before_any_write(tmp_path, m0, tokenizer, case):
    spec, message = MODEL_AND_DATA_CASES[case]
    out = tmp_path / "out"
    before = user_folder(out)
    model = spec.get("model", lambda m: m)(perturbed(m0))
    ref = spec.get("ref", lambda m: m)(copy.deepcopy(m0))
    with pytest.raises((ValueError, TypeError), match=message):
        CreamTrainer(
            model=model,
            ref_model=ref,
            args=cream_args(out),
            train_dataset=spec.get("dataset", chat_prompts)(),
            processing_class=spec.get("tokenizer", lambda t: t)(tokenizer),
        )
    assert tree(out) == before  # nothing written, nothing removed


def test_an_output_dir_that_is_a_file_or_empty_is_refused_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"output_dir='': give the folder the run is saved in"):
        cream_args("")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match=r"output_dir='\S+/out' is an existing file, not a folder.*Choose a folder"):
        cream_args(tmp_path / "out")


def test_half_precision_on_cpu_is_said(tmp_path, m0, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_cream.trainer.validation"):
        CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=cream_args(tmp_path / "out", bf16=True, use_cpu=True),
            train_dataset=chat_prompts(), processing_class=tokenizer,
        )  # fmt: skip
    assert "bf16=True has no effect in this CPU run" in caplog.text and "losses equal float32's" in caplog.text


def test_a_4bit_model_whose_width_bitsandbytes_cannot_block_is_refused(tmp_path, m0, tokenizer):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_cream.trainer.validation import check_quantized_blocks

    m0.save_pretrained(tmp_path / "m0")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m0", quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    with pytest.raises(ValueError, match=r"4-bit layer with 32 input features.*block \(64\).*without 4-bit"):
        check_quantized_blocks(quantized)
    from conftest import tiny_llama

    wide = tiny_llama(tokenizer)
    wide.config.hidden_size, wide.config.head_dim = 64, 16
    wide = type(wide)(wide.config)  # hidden 64: a multiple of the block, so 4-bit on the CPU is allowed
    wide.save_pretrained(tmp_path / "wide")
    check_quantized_blocks(
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "wide", quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
        )
    )


# ---------------------------------------------------------------- issue 23 item 7: the CLI's paths and data files
def test_cli_paths_and_data_files_are_named_before_any_hub_call(tmp_path, monkeypatch):
    from trl_cream.cli import sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in ("./no_such_model", str(tmp_path / "no_such_model"), "models/m1", "prompts.jsonl"):
        with pytest.raises(ValueError, match=rf"--model_name_or_path '{re.escape(missing)}': that local path does"):
            sources.check_local(missing, "--model_name_or_path")
    sources.check_local("HuggingFaceTB/SmolLM2-135M-Instruct", "--model_name_or_path")  # a Hub id: left to the Hub

    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "Say hello."}\n{"prompt": "caf\xe9?"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 2 is not valid UTF-8 \(byte 0xe9 at column 16\)"):
        sources.load_data("latin1.jsonl", "train")
    (tmp_path / "prompts.txt").write_text("What is 3 plus 4?\n")
    with pytest.raises(ValueError, match=r"'prompts.txt': a .txt file is not a dataset format trl-cream reads"):
        sources.load_data("prompts.txt", "train")
    __import__("datasets").DatasetDict({"validation": chat_prompts()}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"splits \['validation'\] but no 'train' split.*--dataset_train_split valid"):
        sources.load_data("saved", "train")
    assert len(sources.load_data("saved", "validation")) == len(CHAT)


def test_cli_eval_on_a_folder_that_is_not_a_model_names_it(tmp_path, capsys):
    from trl_cream import cli

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a model")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--checkpoints", f"M1={tmp_path / 'notes'}", "--output_dir", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"--checkpoints M1=\S+notes: that folder holds no model \(neither config\.json", err)
    assert not (tmp_path / "eval").exists()
