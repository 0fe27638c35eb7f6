"""The real demo pipeline at a minimal size: SmolLM2-135M from its wheel, real benchmark rows, M0 -> M3."""

from __future__ import annotations

import json

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
    demo = DemoArguments(size="tiny", eval_max_new_tokens=8, consistency_prompts=2)
    out = run_demo(demo, args)

    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed and "Wall time per phase" in printed
    assert "CREAM round 2/2: C " in printed and "[demo] CREAM rounds\n| round | C |" in printed
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert list(results["accuracy"]) == ["M0", "M1", "M2", "M3"]
    for per_task in results["accuracy"].values():
        assert set(per_task) == {"arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k"}
        assert all(0 <= r["accuracy"] <= 1 and r["n"] > 0 for r in per_task.values())
    assert set(results["consistency"]) == {"M2 vs M1", "M3 vs M2"}
    assert (tmp_path / "report" / "results.png").stat().st_size > 1000
    for m in ("M1", "M2", "M3"):
        assert (tmp_path / m / "adapter_model.safetensors").exists()
    timings = json.loads((tmp_path / "report" / "timings.json").read_text())
    assert {"sft", "round1_generate", "round2_train", "evaluation"} <= set(timings)
    assert [r["round"] for r in out["rounds"]] == [1, 2]
    assert all(0 <= r["consistency"] <= 1 for r in out["rounds"])
