"""The real demo pipeline at a minimal size: SmolLM2-135M from its wheel, real benchmark rows, M0 -> M3."""

from __future__ import annotations

import json
import math

import pytest

from trl_cream import CreamConfig
from trl_cream.recipes.demo import DEMO_DEFAULTS, DemoArguments, run_demo


@pytest.mark.slow
def test_demo_pipeline_minimal(tmp_path, capsys):
    overrides = dict(
        output_dir=str(tmp_path), num_generations=2, max_new_tokens=8, sft_num_train_epochs=1.0, use_cpu=True,
        disable_tqdm=True, generation_batch_size=4, seed=0,
    )  # fmt: skip
    args = CreamConfig(**{**DEMO_DEFAULTS, **overrides})
    demo = DemoArguments(
        size="tiny", eval_max_new_tokens=8, consistency_prompts=2, eval_mc_questions=2, eval_gsm8k_questions=1
    )
    out = run_demo(demo, args)

    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed and "Wall time per phase" in printed
    assert "CREAM round 2/2: C " in printed and "[demo] CREAM rounds\n| round | C |" in printed
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert list(results["accuracy"]) == ["M0", "M1", "M2", "M3"]
    for per_task in results["accuracy"].values():
        assert set(per_task) == {"arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k"}
        assert all(0 <= r["accuracy"] <= 1 and r["n"] > 0 for r in per_task.values())
    assert results["settings"]["num_questions"] == {
        "arc_easy": 2, "arc_challenge": 2, "openbookqa": 2, "siqa": 2, "gsm8k": 1
    }  # fmt: skip
    assert set(results["consistency"]) == {"M2 vs M1", "M3 vs M2"}
    assert (tmp_path / "report" / "results.png").stat().st_size > 1000
    for m in ("M1", "M2", "M3"):
        assert (tmp_path / m / "adapter_model.safetensors").exists()
    timings = json.loads((tmp_path / "report" / "timings.json").read_text())
    assert {"sft", "round1_generate", "round2_train", "evaluation"} <= set(timings)
    assert [r["round"] for r in out["rounds"]] == [1, 2]
    assert all(0 <= r["consistency"] <= 1 for r in out["rounds"])
    # A round moves the adapter unless its C is exactly 0.5, where the CREAM gradient vanishes at the round's start.
    assert all(r["weight_change"] > 0 or r["consistency"] == 0.5 for r in out["rounds"]) and "weights moved" in printed
    assert all(stats["weight_change"] is not None for stats in results["consistency"].values())
    # the demo ends with the run's page (trl-cream inspect) and says where it is
    assert out["page"] == tmp_path / "inspect.html" and f"Inspect the run: {out['page']}" in printed
    page = out["page"].read_text(encoding="utf-8")
    assert page.count('class="prompt-row"') == sum(r["num_prompts"] for r in out["rounds"])


def test_report_says_how_far_each_round_moved_the_weights(tmp_path):
    """Table 2 puts the relative change of the adapter beside C: a round that did not move (M3 = M2) reads C = 1
    with 0 movement ("unchanged"), a round that did reads its ‖Δθ‖/‖θ‖, computed here by hand from the tensors."""
    import copy

    import torch
    from conftest import QUESTIONS, tiny_llama, tiny_tokenizer
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import GenerationConfig

    from trl_cream.evaluation import run_evaluation

    tok = tiny_tokenizer()
    base = tiny_llama(tok, seed=0)
    policy = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    policy.save_pretrained(tmp_path / "M1")
    before = {k: v.detach().clone().double() for k, v in get_peft_model_state_dict(policy).items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    policy.save_pretrained(tmp_path / "M2")
    policy.save_pretrained(tmp_path / "M3")  # a round that moved nothing
    after = {k: v.detach().double() for k, v in get_peft_model_state_dict(policy).items()}
    expected = math.sqrt(
        sum((after[k] - before[k]).pow(2).sum() for k in before) / sum(v.pow(2).sum() for v in before.values())
    )
    assert expected > 1e-3

    rows = [{"question": q, "choices": ["yes", "no"], "answer": "A", "kind": "mc"} for q in QUESTIONS[:2]]
    sampling_config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)  # fmt: skip
    checkpoints = {"M0": base, **{m: tmp_path / m for m in ("M1", "M2", "M3")}}
    results = run_evaluation(
        checkpoints, {"mc": rows}, QUESTIONS[:2], tmp_path / "report", tok, base=base, num_generations=3,
        generation_config=sampling_config, max_length=128, eval_mode="loglikelihood", show_progress=False,
    )  # fmt: skip
    moved = {pair: stats["weight_change"] for pair, stats in results.consistency.items()}
    assert moved["M2 vs M1"] == pytest.approx(expected, rel=1e-6)
    assert moved["M3 vs M2"] == 0.0 and results.consistency["M3 vs M2"]["consistency"]["mean"] == 1.0
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "Weights moved ‖Δθ‖/‖θ‖" in markdown and f"| {expected:.1e} |" in markdown
    assert "| 0.0e+00 |" in markdown


def test_relative_change_is_the_norm_of_the_difference_over_the_norm():
    import torch

    from trl_cream.modeling.movement import relative_change

    old = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # ‖old‖ = 5
    new = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[0.0, 4.0]])}  # ‖new − old‖ = 1
    assert relative_change(old, new) == pytest.approx(0.2)
    assert relative_change(old, old) == 0.0
    assert relative_change({"a": torch.zeros(2)}, {"a": torch.ones(2)}) == math.inf
    with pytest.raises(ValueError, match="different tensors"):
        relative_change(old, {"a": old["a"]})


def test_round_lines_put_the_weight_movement_beside_c():
    from trl_cream.recipes.demo import round_lines

    rounds = [
        {"round": 1, "consistency": 0.31, "kendall_tau_mean": -0.38, "num_pairs": 9, "train_steps": 9,
         "weight_change": 0.0123},
        {"round": 2, "consistency": 1.0, "kendall_tau_mean": 1.0, "num_pairs": 10, "train_steps": 3,
         "weight_change": 0.0},
    ]  # fmt: skip
    lines = round_lines(rounds)
    assert lines[1] == "  round 1: M1 -> M2, C = 0.31, τ = -0.38, 9 pairs, 9 steps, weights moved 1.2e-02"
    assert lines[2].endswith("C = 1.00, τ = 1.00, 10 pairs, 3 steps, weights moved 0.0e+00")
