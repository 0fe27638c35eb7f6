"""Log-likelihood multiple-choice scoring: option log-probs against an independent forward, acc/acc_norm, modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from datasets import Dataset

from trl_cream.evaluation import binomial_stderr, evaluate_loglikelihood, run_evaluation, score_options
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


def test_chat_template_context_is_the_templated_user_turn(tok):
    model = tiny_llama(tok, seed=4).eval()
    (scores,) = score_options(model, tok, ROWS[:1], chat_template=True, show_progress=False)
    context = tok.apply_chat_template(
        [{"role": "user", "content": ROWS[0]["question"]}], tokenize=False, add_generation_prompt=True
    )
    expected = [independent_logps(model, tok, context, c) for c in ROWS[0]["choices"]]
    assert scores == pytest.approx(expected, abs=1e-4)
    contexts, conts, strings = mc_requests(ROWS[0], tok, chat_template=True)
    assert strings == ROWS[0]["choices"] and len(contexts) == len(conts) == 3


def test_acc_and_acc_norm_are_argmax_of_sum_and_per_character(tok):
    model = tiny_llama(tok, seed=5).eval()
    result = evaluate_loglikelihood(model, tok, {"mc": ROWS}, show_progress=False)["mc"]
    assert result.mode == "loglikelihood" and result.n == len(ROWS)
    letters = "ABCD"
    for row, pred in zip(ROWS, result.predictions):
        logps = pred["logprobs"]
        per_char = [lp / len(" " + c) for lp, c in zip(logps, row["choices"])]
        assert pred["prediction"] == letters[max(range(len(logps)), key=logps.__getitem__)]
        assert pred["prediction_norm"] == letters[max(range(len(per_char)), key=per_char.__getitem__)]
    assert result.num_correct == sum(p["prediction"] == r["answer"] for p, r in zip(result.predictions, ROWS))
    assert result.accuracy == result.num_correct / len(ROWS)
    assert result.accuracy_norm == result.num_correct_norm / len(ROWS)
    assert result.stderr == pytest.approx(math.sqrt(result.accuracy * (1 - result.accuracy) / len(ROWS)))
    assert result.stderr_norm == pytest.approx(binomial_stderr(result.accuracy_norm, len(ROWS)))


def test_binomial_stderr():
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert binomial_stderr(0.25, 200) == pytest.approx(math.sqrt(0.25 * 0.75 / 200))
    assert binomial_stderr(1.0, 10) == 0.0 and binomial_stderr(0.3, 0) == 0.0


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
        binomial_stderr(data["accuracy"]["M0"]["mc"]["accuracy"], 4)
    )
    markdown = (tmp_path / "results.md").read_text()
    assert "mc: 4 questions, option log-likelihood" in markdown and "gsm8k: 1 questions, greedy" in markdown
    assert "Table 1b" in markdown and " ± " in markdown
