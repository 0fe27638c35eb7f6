"""Log-likelihood multiple-choice scoring: option log-probs against an independent forward, acc/acc_norm, modes."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, tiny_llama, tiny_tokenizer
from datasets import Dataset
from transformers import AutoTokenizer

from trl_cream.evaluation import (
    binomial_stderr,
    evaluate_loglikelihood,
    run_evaluation,
    sample_stderr,
    score_options,
)
from trl_cream.evaluation import loglikelihood as ll
from trl_cream.evaluation.loglikelihood import MC_CONTEXT, mc_requests, resolve_modes

ROWS = [
    {
        "question": "Which is a mammal?",
        "choices": ["whale", "shark", "a large tuna fish"],
        "answer": "A",
        "kind": "mc",
    },
    {"question": "Plants make food from?", "choices": ["rock", "sunlight and water"], "answer": "B", "kind": "mc"},
    {"question": "Rain comes from?", "choices": ["clouds", "trees", "rocks", "fish"], "answer": "A", "kind": "mc"},
    {"question": "What is 3 plus 4?", "choices": ["7", "8", "12", "34"], "answer": "A", "kind": "mc"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def bos_tokenizer(folder: Path):
    """The tiny ChatML tokenizer, changed to add a BOS token (``<|endoftext|>``) first, as Llama's tokenizers do.

    Its BOS differs from the chat template's first token, so BOS is added in chat mode too.
    """
    shutil.copytree(FIXTURES / "tiny_tokenizer", folder, dirs_exist_ok=True)
    spec = json.loads((folder / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 0  # the variant really adds BOS
    return tokenizer


@pytest.fixture(scope="module", params=["no_bos", "bos"])
def any_tok(request, tmp_path_factory):
    return tiny_tokenizer() if request.param == "no_bos" else bos_tokenizer(tmp_path_factory.mktemp("bos_tok"))


# lm-evaluation-harness's definitions, written down independently of trl_cream (lm_eval/api/model.py
# `TemplateLM._encode_pair`, lm_eval/models/huggingface.py `HFLM.tok_encode`, lm_eval/api/task.py
# `process_results` for multiple_choice, lm_eval/api/metrics.py `mean_stderr`).
def harness_tok_encode(tokenizer, string: str) -> list[int]:
    """The tokenizer's own special tokens, except for a string that already starts with the prefix (BOS) token."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs = {"add_special_tokens": False} if string.startswith(tokenizer.decode(prefix_id)) else {}
    return tokenizer.encode(string, **kwargs)


def harness_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = harness_tok_encode(tokenizer, context + continuation)
    context_enc = harness_tok_encode(tokenizer, context)
    return context_enc, whole_enc[len(context_enc) :]


def harness_requests(tokenizer, row, chat_template: bool) -> list[tuple[str, str]]:
    if chat_template:  # under a chat template the harness uses no target delimiter
        messages = [{"role": "user", "content": row["question"]}]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [(context, c) for c in row["choices"]]
    return [(f"Question: {row['question']}\nAnswer:", " " + c) for c in row["choices"]]


def full_forward_logp(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Σ log p(continuation | context) from one plain, unpadded forward of the whole sequence."""
    whole = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[k - 1, whole[k]].item() for k in range(len(context_ids), len(whole)))


def harness_metrics(rows, lls_per_row) -> dict[str, float]:
    """acc, acc_norm (lls / len(choice), the choice without delimiter) and their mean_stderr (sample std, n - 1)."""
    acc, acc_norm = [], []
    for row, lls in zip(rows, lls_per_row):
        gold = "ABCD".index(row["answer"])
        norm = [ll_ / float(len(c)) for ll_, c in zip(lls, row["choices"])]
        acc.append(1.0 if max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold else 0.0)
        acc_norm.append(1.0 if max(range(len(norm)), key=lambda i: (norm[i], -i)) == gold else 0.0)

    def stderr(values):
        return statistics.stdev(values) / math.sqrt(len(values))

    return {
        "acc": statistics.fmean(acc),
        "acc_norm": statistics.fmean(acc_norm),
        "acc_stderr": stderr(acc),
        "acc_norm_stderr": stderr(acc_norm),
    }


@pytest.mark.parametrize("chat_template", [False, True], ids=["plain", "chat"])
def test_scores_and_metrics_follow_the_harness(any_tok, chat_template):
    """Option log-likelihoods, acc, acc_norm and their standard errors against the harness's definitions computed
    independently: one plain full forward per option on the harness's own request tokens. Tolerance 1e-4 on a
    log-prob sum: the scorer's cached, padded, batched forward differs from a single forward by float rounding."""
    tok = any_tok
    model = tiny_llama(tok, seed=7).eval()
    rows = ROWS * 3  # 12 questions: enough for acc in (0, 1) and a non-zero standard error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_options(model, tok, rows, batch_size=5, chat_template=chat_template, show_progress=False)
    expected = []
    for row in rows:
        requests = [harness_encode_pair(tok, ctx, cont) for ctx, cont in harness_requests(tok, row, chat_template)]
        if tok.bos_token_id == 0:  # the BOS variant: every context starts with BOS, exactly once
            assert all(ctx[0] == 0 and ctx[1] != 0 for ctx, _ in requests)
        expected.append([full_forward_logp(model, ctx, cont) for ctx, cont in requests])
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)
    result = evaluate_loglikelihood(
        model, tok, {"mc": rows}, batch_size=5, chat_template=chat_template, show_progress=False
    )["mc"]
    harness = harness_metrics(rows, expected)
    assert 0 < harness["acc"] < 1  # else the standard error below would be 0 under either definition
    assert result.accuracy == pytest.approx(harness["acc"]) and result.accuracy_norm == pytest.approx(
        harness["acc_norm"]
    )
    assert result.stderr == pytest.approx(harness["acc_stderr"], rel=1e-9)
    assert result.stderr_norm == pytest.approx(harness["acc_norm_stderr"], rel=1e-9)
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # transformers 5.24's deprecation


def test_acc_norm_divides_by_the_option_text_without_delimiter(tok, monkeypatch):
    """Options "ab" (2 characters) and "cdefg" (5): log-probs -3 and -6 give -1.5 vs -1.2 per character of the
    option (harness: B), but -1.0 vs -1.0 then A first per character of " option" (the old definition: A)."""
    rows = [{"question": "q?", "choices": ["ab", "cdefg"], "answer": "B", "kind": "mc"}] * 3
    rows = rows + [{"question": "r?", "choices": ["ab", "cdefg"], "answer": "A", "kind": "mc"}]
    monkeypatch.setattr(ll, "score_options", lambda *args, **kwargs: [[-3.0, -6.0]] * len(rows))
    result = evaluate_loglikelihood(None, tok, {"mc": rows}, show_progress=False)["mc"]
    assert [p["prediction_norm"] for p in result.predictions] == ["B"] * 4
    assert [p["prediction"] for p in result.predictions] == ["A"] * 4  # acc: the higher sum
    assert result.accuracy_norm == 0.75 and result.accuracy == 0.25
    assert result.stderr_norm == pytest.approx(statistics.stdev([1, 1, 1, 0]) / 2)  # sample std (n - 1) / √n
    assert result.stderr_norm == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def independent_logps(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context) from one unpadded full-sequence forward and log_softmax."""
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(context_ids)] == context_ids  # the split below is the natural tokenisation
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[k - 1, whole[k]].item() for k in range(len(context_ids), len(whole)))


@pytest.mark.parametrize("batch_size", [1, 5])
def test_option_logps_match_an_independent_full_forward(tok, batch_size):
    model = tiny_llama(tok, seed=3).eval()
    scores = score_options(model, tok, ROWS, batch_size=batch_size, show_progress=False)
    for row, row_scores in zip(ROWS, scores):
        context = MC_CONTEXT.format(question=row["question"])
        expected = [independent_logps(model, tok, context, " " + c) for c in row["choices"]]
        assert row_scores == pytest.approx(expected, abs=1e-4)


def test_chat_requests_move_the_generation_prompts_newline_into_the_continuation(tok):
    """The ChatML generation prompt ends in a newline: as in the harness, it is scored with the option."""
    contexts, conts, strings = mc_requests(ROWS[0], tok, chat_template=True)
    assert strings == ROWS[0]["choices"] and len(contexts) == len(conts) == 3
    context = tok.apply_chat_template(
        [{"role": "user", "content": ROWS[0]["question"]}], tokenize=False, add_generation_prompt=True
    )
    assert context.endswith("\n") and tok.decode(contexts[0]) == context[:-1]
    assert [tok.decode(c) for c in conts] == ["\n" + c for c in ROWS[0]["choices"]]


def test_acc_and_acc_norm_are_argmax_of_sum_and_per_character(tok):
    model = tiny_llama(tok, seed=5).eval()
    result = evaluate_loglikelihood(model, tok, {"mc": ROWS}, show_progress=False)["mc"]
    assert result.mode == "loglikelihood" and result.n == len(ROWS)
    letters = "ABCD"
    for row, pred in zip(ROWS, result.predictions):
        logps = pred["logprobs"]
        per_char = [lp / len(c) for lp, c in zip(logps, row["choices"])]
        assert pred["prediction"] == letters[max(range(len(logps)), key=logps.__getitem__)]
        assert pred["prediction_norm"] == letters[max(range(len(per_char)), key=per_char.__getitem__)]
    assert result.num_correct == sum(p["prediction"] == r["answer"] for p, r in zip(result.predictions, ROWS))
    assert result.accuracy == result.num_correct / len(ROWS)
    assert result.accuracy_norm == result.num_correct_norm / len(ROWS)
    assert result.stderr == pytest.approx(math.sqrt(result.accuracy * (1 - result.accuracy) / (len(ROWS) - 1)))
    assert result.stderr_norm == pytest.approx(sample_stderr(result.accuracy_norm, len(ROWS)))


def test_standard_errors():
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert binomial_stderr(0.25, 200) == pytest.approx(math.sqrt(0.25 * 0.75 / 200))
    assert binomial_stderr(1.0, 10) == 0.0 and binomial_stderr(0.3, 0) == 0.0
    scores = [1.0] * 30 + [0.0] * 70  # the harness's mean_stderr: sample std (n - 1) over √n
    assert sample_stderr(0.3, 100) == pytest.approx(statistics.stdev(scores) / 10)
    assert sample_stderr(0.3, 100) == pytest.approx(binomial_stderr(0.3, 100) * math.sqrt(100 / 99))
    assert sample_stderr(0.3, 1) == 0.0 and sample_stderr(0.3, 0) == 0.0


def test_bad_rows_and_modes_are_rejected(tok):
    model = tiny_llama(tok).eval()
    with pytest.raises(ValueError, match="gold answer 'C'"):
        evaluate_loglikelihood(model, tok, {"mc": [{**ROWS[1], "answer": "C"}]}, show_progress=False)
    gsm = [{"prompt": "What is 2+2?", "answer": "4", "kind": "gsm8k", "choices": []}]
    sets = {"mc": ROWS, "gsm8k": gsm}
    assert resolve_modes(sets, "loglikelihood") == {"mc": "loglikelihood", "gsm8k": "generate"}
    assert resolve_modes(sets, {"mc": "loglikelihood"}) == {"mc": "loglikelihood", "gsm8k": "generate"}
    with pytest.raises(ValueError, match="no `choices`"):
        resolve_modes(sets, {"gsm8k": "loglikelihood"})
    with pytest.raises(ValueError, match="Unknown evaluation mode 'vibes'"):
        resolve_modes(sets, "vibes")


def test_run_evaluation_mixes_modes_and_reports_stderr(tok, tmp_path: Path):
    checkpoints = {"M0": tiny_llama(tok, 0).eval(), "M1": tiny_llama(tok, 1).eval()}
    gsm = [
        {"task": "gsm8k", "prompt": "What is 2+2?", "answer": "4", "kind": "gsm8k", "num_choices": 0, "choices": []}
    ]
    sets = {"mc": Dataset.from_list(ROWS), "gsm8k": Dataset.from_list(gsm)}
    results = run_evaluation(
        checkpoints, sets, None, tmp_path, tok, max_new_tokens=3, eval_mode="loglikelihood", show_progress=False
    )
    assert results.accuracy["M1"]["mc"].mode == "loglikelihood" and results.accuracy["M1"]["gsm8k"].mode == "generate"
    assert results.settings["num_questions"] == {"mc": 4, "gsm8k": 1}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["accuracy"]["M0"]["mc"]["stderr"] == pytest.approx(
        sample_stderr(data["accuracy"]["M0"]["mc"]["accuracy"], 4)
    )
    assert data["settings"]["initial_policy"] == "M0"
    markdown = (tmp_path / "results.md").read_text()
    assert "mc: 4 questions, option log-likelihood" in markdown and "gsm8k: 1 questions, greedy" in markdown
    assert "Table 1b" in markdown and " ± " in markdown
    assert "π_0 (the reference of the implicit rewards r = log π_k − log π_0) is the first checkpoint, M0" in markdown
