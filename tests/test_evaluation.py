"""Evaluation harness: accuracy, ranking consistency (Table 2), checkpoint loading and the report files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from datasets import Dataset
from scipy import stats
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from trl_cream.evaluation import (
    EvaluationResults,
    TaskResult,
    consistency_stats,
    evaluate_accuracy,
    load_checkpoint,
    ranking_consistency,
    run_evaluation,
)
from trl_cream.evaluation.report import render_markdown, write_report
from trl_cream.modeling import sampling

PROMPTS = ["What is 12 plus 30?", "Name a mammal.", "Where does rain come from?", "Hello, how are you today?"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return tiny_tokenizer()


def make_llama(tok: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    return tiny_llama(tok, seed).eval()


def sampling_config(tok: PreTrainedTokenizerBase, max_new_tokens: int = 8) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


def eval_sets() -> dict[str, Dataset]:
    mc = [
        {
            "task": "arc",
            "prompt": "Which is a mammal?\nA. whale\nB. shark",
            "answer": "A",
            "kind": "mc",
            "num_choices": 2,
        },
        {
            "task": "arc",
            "prompt": "Plants make food from?\nA. rock\nB. sun\nC. salt",
            "answer": "B",
            "kind": "mc",
            "num_choices": 3,
        },
        {
            "task": "arc",
            "prompt": "Rain comes from?\nA. clouds\nB. trees\nC. rocks\nD. fish",
            "answer": "1",
            "kind": "mc",
            "num_choices": 4,
        },
    ]
    gsm = [
        {"task": "gsm8k", "prompt": "What is 12 plus 30?", "answer": "42", "kind": "gsm8k", "num_choices": 0},
        {
            "task": "gsm8k",
            "prompt": "What is 3 plus 4 plus 5 plus 6?",
            "answer": "Adding.\n#### 18",
            "kind": "gsm8k",
            "num_choices": 0,
        },
    ]
    return {"arc": Dataset.from_list(mc), "gsm8k": Dataset.from_list(gsm)}


def test_evaluate_accuracy_tiny_model(tok: PreTrainedTokenizerBase) -> None:
    sets = eval_sets()
    results = evaluate_accuracy(make_llama(tok, 0), tok, sets, max_new_tokens=8, batch_size=2, show_progress=False)
    assert list(results) == ["arc", "gsm8k"]
    for task, result in results.items():
        assert result.task == task
        assert result.n == len(sets[task])
        assert 0.0 <= result.accuracy <= 1.0
        assert result.num_correct == sum(p["correct"] for p in result.predictions)
        assert [p["prompt"] for p in result.predictions] == sets[task]["prompt"]  # original order
        assert all(isinstance(p["completion"], str) for p in result.predictions)


def fake_generation(tok: PreTrainedTokenizerBase, reply: dict[str, str]):
    """A `generate_candidates` stand-in that answers each prompt with ``reply[prompt text]``."""

    def generate(model, tokenizer, prompt_ids, num_generations, generation_config, *args, **kwargs):
        assert num_generations == 1 and generation_config.do_sample is False
        assert generation_config.eos_token_id == tok.eos_token_id
        out = []
        for ids in prompt_ids:
            text = tok.decode(ids)
            (answer,) = [r for p, r in reply.items() if f"<|im_start|>user\n{p}<|im_end|>" in text]
            out.append([tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        return out

    return generate


@pytest.mark.parametrize("gold", [True, False])
def test_evaluate_accuracy_with_scripted_answers(
    tok: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch, gold: bool
) -> None:
    sets = eval_sets()
    reply = {}
    for row in [row for dataset in sets.values() for row in dataset]:
        if row["kind"] == "mc":
            letter = "A" if row["answer"] in ("A", "1") else "B"
            answer = letter if gold else ("C" if letter != "C" else "A")
        else:
            answer = row["answer"].split("#### ")[-1] if gold else "1000"
        reply[row["prompt"]] = f"Let me think. The answer is {answer}."
    monkeypatch.setattr(sampling, "generate_candidates", fake_generation(tok, reply))
    results = evaluate_accuracy(make_llama(tok, 0), tok, sets, show_progress=False)
    expected = 1.0 if gold else 0.0
    assert {task: r.accuracy for task, r in results.items()} == {"arc": expected, "gsm8k": expected}
    assert results["arc"].num_correct == (3 if gold else 0)
    assert results["arc"].predictions[0]["completion"] == reply[sets["arc"][0]["prompt"]]


def test_ranking_consistency_same_model_is_fully_consistent(tok: PreTrainedTokenizerBase) -> None:
    model, initial = make_llama(tok, 1), make_llama(tok, 2)
    result = ranking_consistency(
        model,
        model,
        initial,
        tok,
        PROMPTS,
        num_generations=4,
        generation_config=sampling_config(tok),
        seed=0,
        show_progress=False,
    )
    assert result["num_prompts"] == len(PROMPTS) and result["num_generations"] == 4
    assert result["num_defined"] > 0
    assert result["num_defined"] + result["num_undefined"] == len(PROMPTS)
    defined = [i for i, t in enumerate(result["per_prompt"]["kendall_tau"]) if t is not None]
    assert len(defined) == result["num_defined"]
    for i in defined:
        assert result["per_prompt"]["kendall_tau"][i] == pytest.approx(1.0)
        assert result["per_prompt"]["consistency"][i] == pytest.approx(1.0)
        assert result["per_prompt"]["top_order"][i] == 1.0
    assert result["consistency"] == {"mean": pytest.approx(1.0), "std": pytest.approx(0.0)}
    assert result["kendall_tau"]["mean"] == pytest.approx(1.0)


def test_ranking_consistency_round_one_and_seed(tok: PreTrainedTokenizerBase) -> None:
    """``old is initial`` uses π_0's length-normalised likelihood; the same seed gives the same numbers."""
    model, initial = make_llama(tok, 1), make_llama(tok, 2)
    kwargs = dict(num_generations=3, generation_config=sampling_config(tok), seed=3, show_progress=False)
    first = ranking_consistency(model, initial, initial, tok, PROMPTS, **kwargs)
    second = ranking_consistency(model, None, initial, tok, Dataset.from_dict({"prompt": PROMPTS}), **kwargs)
    assert first == second
    for key in ("consistency", "spearman_normalized", "top_order"):
        assert first[key]["mean"] is None or 0.0 <= first[key]["mean"] <= 1.0


def test_ranking_consistency_peft_disabled_adapter_is_initial(tok: PreTrainedTokenizerBase) -> None:
    peft = pytest.importorskip("peft")
    base = make_llama(tok, 1)
    initial = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    kwargs = dict(num_generations=3, generation_config=sampling_config(tok), seed=0, show_progress=False)
    explicit = ranking_consistency(model, initial, initial, tok, PROMPTS, **kwargs)
    implicit = ranking_consistency(model, None, None, tok, PROMPTS, **kwargs)
    assert implicit == explicit
    assert explicit["num_defined"] > 0  # the adapter is not the identity, so rewards are not all zero
    with pytest.raises(ValueError, match="not a PeftModel"):
        ranking_consistency(initial, None, None, tok, PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        ranking_consistency(model, None, None, tok, PROMPTS, num_generations=1)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_consistency_stats_matches_scipy() -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (40, 5), generator=generator).double()  # many ties
    baseline = torch.randint(0, 4, (40, 5), generator=generator).double()
    rewards[0] = 1.0  # entirely tied rows: undefined
    baseline[1] = 2.0
    baseline[2] = rewards[2] * 3 - 1  # same ranking
    result = consistency_stats(rewards, baseline)
    taus, rhos = [], []
    for j in range(rewards.shape[0]):
        tau = stats.kendalltau(rewards[j].numpy(), baseline[j].numpy()).statistic
        rho = stats.spearmanr(rewards[j].numpy(), baseline[j].numpy()).statistic
        got_tau, got_rho = result["per_prompt"]["kendall_tau"][j], result["per_prompt"]["spearman"][j]
        if math.isnan(tau):
            assert got_tau is None and got_rho is None and result["per_prompt"]["top_order"][j] is None
            continue
        assert got_tau == pytest.approx(tau) and got_rho == pytest.approx(rho)
        assert result["per_prompt"]["consistency"][j] == pytest.approx((tau + 1) / 2)
        taus.append(tau)
        rhos.append(rho)
    assert result["num_prompts"] == 40 and result["num_undefined"] == 40 - len(taus) >= 2
    assert result["per_prompt"]["kendall_tau"][2] == pytest.approx(1.0)
    t, r = torch.tensor(taus), torch.tensor(rhos)
    assert result["kendall_tau"]["mean"] == pytest.approx(t.mean().item())
    assert result["kendall_tau"]["std"] == pytest.approx(t.std(correction=0).item())
    assert result["consistency"]["mean"] == pytest.approx(((t + 1) / 2).mean().item())
    assert result["spearman"]["mean"] == pytest.approx(r.mean().item())
    assert result["spearman_normalized"]["mean"] == pytest.approx(((r + 1) / 2).mean().item())
    json.dumps(result, allow_nan=False)  # per-row nan became None


def test_consistency_stats_all_undefined() -> None:
    result = consistency_stats(torch.zeros(3, 4), torch.randn(3, 4))
    assert result["num_undefined"] == 3
    assert result["kendall_tau"] == {"mean": None, "std": None}


def handmade_results() -> EvaluationResults:
    accuracy = {
        "M0": {"arc": 0.30, "gsm8k": 0.02},
        "M1": {"arc": 0.35, "gsm8k": 0.02},
        "M2": {"arc": 0.55, "gsm8k": 0.01},
        "M3": {"arc": 0.38, "gsm8k": 0.05},
    }
    results = EvaluationResults(iterations=list(accuracy))
    for iteration, tasks in accuracy.items():
        results.accuracy[iteration] = {
            t: TaskResult(
                t, a, 100, round(100 * a), [{"prompt": "p", "answer": "A", "completion": "A", "correct": True}]
            )
            for t, a in tasks.items()
        }

    def pair(c: float, c_std: float) -> dict:
        stat = {"mean": 2 * c - 1, "std": 2 * c_std}
        return {
            "consistency": {"mean": c, "std": c_std},
            "kendall_tau": stat,
            "spearman": stat,
            "spearman_normalized": {"mean": c, "std": c_std},
            "top_order": {"mean": 0.19, "std": 0.39},
            "num_prompts": 64,
            "num_defined": 62,
            "num_undefined": 2,
            "per_prompt": {"kendall_tau": [None, 0.5]},
        }

    results.consistency = {"M2 vs M1": pair(0.73, 0.18), "M3 vs M2": pair(0.92, 0.09)}
    return results


def test_write_report(tmp_path: Path) -> None:
    results = handmade_results()
    paths = write_report(results, tmp_path / "report")
    assert set(paths) == {"json", "markdown", "png"}
    assert all(p.exists() for p in paths.values())
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["accuracy"]["M3"]["arc"]["predictions"][0]["completion"] == "A"
    assert EvaluationResults.from_dict(data) == results  # the JSON holds everything
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown == render_markdown(results) == render_markdown(data)

    def se(p: float) -> float:  # lm-evaluation-harness's standard error in points, n = 100: sample std / √n
        return 100 * math.sqrt(p * (1 - p) / 99)

    avg_se = math.sqrt(se(0.30) ** 2 + se(0.02) ** 2) / 2
    assert f"| M0 | 30.00 ± {se(0.30):.2f} | 2.00 ± {se(0.02):.2f} | 16.00 ± {avg_se:.2f} |" in markdown
    # ↑/↓ only beyond twice the change's standard error sqrt(se² + se_previous²): +5 on arc (2 SE = 13.2) and
    # +4 on gsm8k (2 SE = 4.8) stay unmarked; +20 and −17 on arc (2 SE = 13.9, 13.7) are marked
    assert 2 * math.hypot(se(0.30), se(0.35)) > 5 and 2 * math.hypot(se(0.01), se(0.05)) > 4
    assert 2 * math.hypot(se(0.35), se(0.55)) < 20 and 2 * math.hypot(se(0.55), se(0.38)) < 17
    assert f"| M1 | 35.00 ± {se(0.35):.2f} | 2.00 ± {se(0.02):.2f} |" in markdown
    assert f"| M2 | 55.00 ± {se(0.55):.2f} ↑ | 1.00 ± {se(0.01):.2f} |" in markdown
    assert f"| M3 | 38.00 ± {se(0.38):.2f} ↓ | 5.00 ± {se(0.05):.2f} |" in markdown
    assert "beyond twice its standard error" in markdown
    assert "arc: 100 questions, greedy answer, extracted" in markdown
    assert data["accuracy"]["M0"]["arc"]["stderr"] == pytest.approx(se(0.30) / 100)
    assert "| M2 vs M1 | 0.73 ± 0.18 | 0.46 ± 0.36 | 0.73 ± 0.18 | 0.19 ± 0.39 | 64 (2) |" in markdown
    assert "| M3 vs M2 | 0.92 ± 0.09 |" in markdown
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_render_markdown_without_pairs() -> None:
    results = handmade_results()
    results.consistency = {}
    assert "_No pairs" in render_markdown(results)
    with pytest.raises(ValueError, match="missing"):
        render_markdown({"iterations": []})


def test_load_checkpoint(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    model = make_llama(tok, 4)
    model.save_pretrained(tmp_path / "full")
    loaded = load_checkpoint(tmp_path / "full")
    assert not loaded.training
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    peft = pytest.importorskip("peft")
    adapter = peft.get_peft_model(make_llama(tok, 4), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    for base in (tmp_path / "full", model):
        loaded = load_checkpoint(tmp_path / "adapter", base=base)
        assert isinstance(loaded, peft.PeftModel)
    assert not any("lora" in name for name, _ in model.named_parameters())  # the passed base was copied
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither config.json"):
        load_checkpoint(tmp_path / "empty")


def test_run_evaluation(tok: PreTrainedTokenizerBase, tmp_path: Path, capsys, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="trl_cream.evaluation.harness")
    m0 = make_llama(tok, 0)
    make_llama(tok, 1).save_pretrained(tmp_path / "m1")
    checkpoints = {"M0": m0, "M1": tmp_path / "m1", "M2": make_llama(tok, 2), "M3": make_llama(tok, 3)}
    sets = {name: dataset.select(range(2)) for name, dataset in eval_sets().items()}
    results = run_evaluation(
        checkpoints,
        sets,
        PROMPTS[:3],
        tmp_path / "out",
        tok,
        max_new_tokens=4,
        num_generations=3,
        generation_config=sampling_config(tok, 4),
        show_progress=True,
    )
    # one progress bar for the whole evaluation (4 accuracies + 2 pairs), not one per model x task x batch kind
    bars = capsys.readouterr().err
    assert "evaluation (Table 1, Table 2)" in bars and "6/6" in bars
    assert "M0 accuracy arc" not in bars and "sampling" not in bars and "scoring" not in bars
    # the per-task detail goes to the log
    assert any(r.getMessage().startswith("M2 arc: accuracy") for r in caplog.records)
    assert any(r.getMessage().startswith("Table 2, M3 vs M2: done") for r in caplog.records)
    assert results.iterations == ["M0", "M1", "M2", "M3"]
    assert all(set(results.accuracy[it]) == {"arc", "gsm8k"} for it in results.iterations)
    assert list(results.consistency) == ["M2 vs M1", "M3 vs M2"]
    assert all(stat["num_prompts"] == 3 for stat in results.consistency.values())
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "results.png"}
    assert "| M3 vs M2 |" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        run_evaluation({}, sets, None, None, tok)


def _results(*modes: str) -> dict:
    accuracy = {f"task{i}": {"accuracy": 0.5, "n": 10, "mode": mode} for i, mode in enumerate(modes)}
    return {"iterations": ["M0"], "accuracy": {"M0": accuracy}, "consistency": {}}


def test_loglikelihood_footnote_only_when_a_task_used_it():
    generated = render_markdown(_results("generate", "generate"))
    assert "Log-likelihood tasks" not in generated and "sqrt(p(1-p)" in generated
    mixed = render_markdown(_results("generate", "loglikelihood"))
    assert "Log-likelihood tasks: `acc`" in mixed and "sqrt(p(1-p)" in mixed
