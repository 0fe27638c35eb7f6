"""Reward sources: reward model (sequence classification or a function), LLM-as-a-judge, external baseline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import load_from_disk
from transformers import LlamaConfig, LlamaForSequenceClassification

from trl_cream import CreamTrainer
from trl_cream.modeling import reward_sources
from trl_cream.modeling.reward_sources import JUDGE_FAILURE_SCORE, judge_scores, parse_judge_score, reward_model_scores

PROMPTS = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
COMPLETIONS = [["Seven.", "It is 7", "no idea"], ["A whale.", "cat", "Dogs are mammals."]]


def tiny_reward_model(tokenizer, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The response is relevant and direct.\nScore: 4/5", 4.0),
        ("4.5", 4.5),
        ("Score: 2\nOn reflection it deserves more.\nScore: 3", 3.0),  # two scores: the final one
        ("**Score:** 5", 5.0),
        ("I would give this 3 out of 5.", 3.0),
        ("It covers two of the criteria, so 2/5 overall", 2.0),
        ("The response is fine.", None),  # no score at all
        ("", None),
        (None, None),
        ("Score: 7", None),  # outside the 0-5 scale
        ("Score: -", None),
    ],
)
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_sequence_classification_reward_model_matches_a_direct_forward(tokenizer):
    rm = tiny_reward_model(tokenizer)
    scores = reward_model_scores(rm, tokenizer, PROMPTS, COMPLETIONS, batch_size=4, show_progress=False)
    assert scores.shape == (2, 3)
    for j, prompt in enumerate(PROMPTS):
        for i, completion in enumerate(COMPLETIONS[j]):
            text = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": completion}], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                expected = rm(**ids).logits[0, 0].item()
            assert scores[j, i].item() == pytest.approx(expected, abs=1e-5)
    two_labels = LlamaForSequenceClassification(rm.config.__class__(**{**rm.config.to_dict(), "num_labels": 2}))
    with pytest.raises(ValueError, match="num_labels=2"):
        reward_model_scores(two_labels, tokenizer, PROMPTS, COMPLETIONS, show_progress=False)


def test_trl_style_reward_function_gets_prompts_and_completions():
    seen = {}

    def length_reward(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [len(c[0]["content"]) for c in completions]

    scores = reward_model_scores(length_reward, None, PROMPTS, COMPLETIONS, show_progress=False)
    assert scores.tolist() == [[6.0, 7.0, 7.0], [8.0, 3.0, 17.0]]
    assert len(seen["prompts"]) == 6 and seen["prompts"][3] == PROMPTS[1]
    assert seen["completions"][0] == [{"role": "assistant", "content": "Seven."}]


def test_judge_counts_parse_failures_and_ties(tokenizer, monkeypatch):
    scripted = iter(["Score: 4", "meh", "Score: 4/5", "Score: 2", "Score: 2", "Score: 2"])

    def fake_generate(model, tok, prompt_ids, n, config, batch_size, show_progress, desc):
        assert all("additive 5-point" in tok.decode(ids) for ids in prompt_ids)
        return [[tok(next(scripted), add_special_tokens=False)["input_ids"]] for _ in prompt_ids]

    monkeypatch.setattr(reward_sources.sampling, "generate_candidates", fake_generate)
    scores, metrics, judgements = judge_scores(None, tokenizer, PROMPTS, COMPLETIONS, show_progress=False)
    assert scores.tolist() == [[4.0, JUDGE_FAILURE_SCORE, 4.0], [2.0, 2.0, 2.0]]
    assert metrics["judge_parse_failures"] == 1 and metrics["judge_parse_failure_rate"] == pytest.approx(1 / 6)
    assert metrics["judge_tied_prompts"] == 1 and metrics["judge_tied_best"] == 2
    assert judgements[1] == "meh"


def test_judge_with_a_real_tiny_model_runs_and_scores_every_candidate(tokenizer, m0):
    scores, metrics, judgements = judge_scores(
        m0, tokenizer, PROMPTS, COMPLETIONS, max_new_tokens=4, show_progress=False
    )
    assert scores.shape == (2, 3) and len(judgements) == 6
    parsed = [parse_judge_score(j) for j in judgements]
    assert metrics["judge_parse_failures"] == sum(p is None for p in parsed)
    assert all((s == JUDGE_FAILURE_SCORE) == (p is None) for s, p in zip(scores.flatten().tolist(), parsed))


def test_setup_mismatches_fail_up_front(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path, reward_source="reward_model")
    with pytest.raises(ValueError, match="need a reward model"):
        CreamTrainer(model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer)
    with pytest.raises(ValueError, match="would be ignored"):
        CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=cream_args(tmp_path), train_dataset=prompts,
            processing_class=tokenizer, reward_model=tiny_reward_model(tokenizer),
        )  # fmt: skip
    with pytest.raises(ValueError, match="reward_source='sentiment' is unknown"):
        cream_args(tmp_path, reward_source="sentiment")


def _one_round(tmp_path, m0, tokenizer, prompts, **kwargs):
    model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.endswith(("_model", "_class"))}
    args = cream_args(tmp_path, num_iterations=1, **kwargs)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer,
        **model_kwargs,
    )  # fmt: skip
    trainer.train()
    return _round_1(tmp_path)


def _round_1(out):
    """Round 1's candidates, pairs (None without any) and metrics, read from a finished run's folder."""
    round_dir = out / "rounds" / "round_1"
    metrics = json.loads((round_dir / "metrics.json").read_text())
    pairs = load_from_disk(str(round_dir / "pairs")) if metrics["num_pairs"] else None  # datasets can't load 0 rows
    return load_from_disk(str(round_dir / "candidates")), pairs, metrics


def test_reward_model_source_forms_pairs_from_its_scores(tmp_path, m0, tokenizer, prompts):
    rm = tiny_reward_model(tokenizer, seed=5)
    candidates, pairs, metrics = _one_round(
        tmp_path, m0, tokenizer, prompts, reward_source="reward_model", reward_model=rm,
        reward_processing_class=tokenizer,
    )  # fmt: skip
    by_prompt: dict[int, list] = {}
    for row in candidates:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    assert len(pairs) > 0
    for pair in pairs:
        rows = by_prompt[pair["prompt_index"]]
        prompt = [{"role": "user", "content": json.loads(rows[0]["prompt"])[0]["content"]}]
        expected = reward_model_scores(rm, tokenizer, [prompt], [[r["completion"] for r in rows]], show_progress=False)
        assert [r["reward"] for r in rows] == pytest.approx(expected[0].tolist(), abs=1e-5)  # r is the RM score
        assert pair["chosen_index"] == int(expected[0].argmax()) and pair["rejected_index"] == int(
            expected[0].argmin()
        )
        # The DPO reference is still the round-start policy's log-prob, not the reward model's.
        assert pair["ref_chosen_logps"] == pytest.approx(rows[pair["chosen_index"]]["logp_policy"])
    assert "reward_model_score_mean" in metrics


def test_judge_source_with_the_policy_as_judge(tmp_path, m0, tokenizer, prompts):
    candidates, pairs, metrics = _one_round(
        tmp_path, m0, tokenizer, prompts, reward_source="judge", judge_max_new_tokens=4
    )
    assert {"judge_parse_failures", "judge_tied_prompts", "judge_tied_best"} <= set(metrics)
    # A random tiny model writes no "Score:": every judgement fails, every prompt is tied, no pair is formed.
    assert metrics["judge_parse_failures"] == len(candidates)
    assert metrics["num_pairs"] == 0 and metrics["judge_tied_prompts"] == metrics["num_prompts"]
    assert set(candidates["reward"]) == {JUDGE_FAILURE_SCORE}


def test_baseline_from_a_reward_model_changes_c_and_nothing_else(
    finished_one_round_run, tmp_path, m0, tokenizer, prompts
):
    rm = tiny_reward_model(tokenizer, seed=7)
    cand_a, pairs_a, metrics_a = _round_1(finished_one_round_run.out)  # = _one_round(tmp_path / "a", ...) unchanged
    cand_b, pairs_b, metrics_b = _one_round(
        tmp_path / "b", m0, tokenizer, prompts, baseline_source="reward_model", reward_model=rm,
        reward_processing_class=tokenizer,
    )  # fmt: skip
    assert cand_a["completion_input_ids"] == cand_b["completion_input_ids"]
    assert cand_a["reward"] == cand_b["reward"]
    for column in ("prompt_index", "chosen_index", "rejected_index", "ref_chosen_logps", "ref_rejected_logps"):
        assert pairs_a[column] == pairs_b[column]
    assert cand_a["baseline_reward"] != cand_b["baseline_reward"]
    assert metrics_a["consistency"] != metrics_b["consistency"]
