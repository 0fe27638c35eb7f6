"""Smoke runs of benchmarks/round_cost.py and benchmarks/vs_naive.py on the tiny model: structure only, no timing
asserted (timings belong in benchmarks/README.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import ab_switch  # noqa: E402
import gpu_check  # noqa: E402
import round_cost  # noqa: E402
import vs_naive  # noqa: E402

TINY = ["--model", "tiny", "--prompts", "4", "--num_generations", "2", "--new_tokens", "6", "--repeats", "1"]


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_round_cost_structure(capsys):
    result = round_cost.main(TINY + ["--candidates"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert round_cost.json.loads(printed) == result
    assert set(result["parts_s"]) == {"generate", "score_pi_t", "score_pi_0", "score_pi_t-1", "train"}
    assert set(result["round_phases_s"]) == {"generate", "score", "pair", "train", "save"}
    assert result["num_pairs"] > 0 and result["round_index"] == 2
    assert positive(result["round_over_parts"]) and positive(result["round_without_save_over_parts"])
    assert result["sum_parts_s"] == pytest.approx(sum(result["parts_s"].values()), abs=1e-3)
    # π_t's log-probs taken from the sampling pass agree with the scoring forward
    assert result["candidates"]["logps_from_sampling_max_abs_diff"] < 1e-3


def test_round_cost_child_reports_memory():
    result = round_cost.run_child(round_cost.parser().parse_args(TINY + ["--child"]))
    assert positive(result["round_s"]) and {"generate_s", "score_s", "train_s"} <= set(result)
    assert result["maxrss_after_round_mib"] >= result["maxrss_before_round_mib"] > 0


def test_vs_naive_trains_both_arms_on_the_same_pairs(capsys):
    result = vs_naive.main(TINY[:-1] + ["2"])  # two repetitions: A/B then B/A
    assert result["same_pairs"] is True and result["num_pairs"] > 0
    assert positive(result["cream_over_naive"])
    assert all(positive(v) for v in result["medians"].values())
    assert 0 <= result["dpo_trainer_token_identical_fraction"] <= 1


def test_ab_switch_freeze_gc_is_exact(capsys):
    result = ab_switch.main(TINY + ["--field", "freeze_gc"])
    assert result["same_pairs_every_repeat"] is True and result["pairs_bit_identical_every_repeat"] is True
    assert result["max_abs_diff_ref_chosen_logps"] == 0.0 and positive(result["on_over_off"])


def test_gpu_check_cpu_smoke_runs_every_cpu_part(tmp_path):
    pytest.importorskip("bitsandbytes")
    report = gpu_check.main(["--cpu-smoke", "--no-results", "--out", str(tmp_path / "gpu_check.json")])
    assert gpu_check.json.loads((tmp_path / "gpu_check.json").read_text()) == report
    assert report["mode"] == "cpu-smoke"
    qlora = report["qlora_round"]
    assert "failed" not in qlora, qlora.get("traceback")
    assert qlora["num_linear4bit"] == 2 * 7 and qlora["all_nf4_quantized"]  # the base is really NF4
    assert {"sample", "score", "train", "save_M2"} <= set(qlora["phases"]) and qlora["num_pairs"] > 0
    for model in ("smollm2_135m_bf16", "llama3_8b_qlora"):
        rates = report["sampling"][model]
        assert positive(rates["generate"]) and positive(rates["paged"]) and positive(rates["paged_over_generate"])
    assert len(report["bf16_demo"]["rounds"]) == 2
    assert "tests/test_engines.py" in report["zero3_tiny"]["skipped"]
    section = gpu_check.results_section(report)
    assert section.startswith("## ") and "gpu_check.py (cpu-smoke)" in section
