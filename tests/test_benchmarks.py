"""Smoke runs of the benchmarks on the tiny model. No speed is asserted (speeds belong in benchmarks/RESULTS.md), but
every check can fail: the reported ratios must be the ratios of the reported times, a round's phases must fit inside
the round, both arms of a comparison must train on the same pairs, and a tiny round must not grow the process's
memory by gigabytes."""

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


TINY_PROMPTS = 4
ROUND_RSS_GROWTH_LIMIT_MIB = 1024  # a round of the 2-layer, hidden-32 model allocates a few MiB; GBs mean a leak


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def phases_fit_in(phases: dict[str, float], total_s: float) -> bool:
    """The phases are disjoint intervals of the round: their sum cannot exceed it (rounding of each to 1 ms aside)."""
    return sum(phases.values()) <= total_s + 1e-3 * len(phases)


def test_round_cost_structure(capsys):
    result = round_cost.main(TINY + ["--candidates"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert round_cost.json.loads(printed) == result
    assert set(result["parts_s"]) == {"generate", "score_pi_t", "score_pi_0", "score_pi_t-1", "train"}
    assert set(result["round_phases_s"]) == {"generate", "score", "pair", "train", "save"}
    assert 0 < result["num_pairs"] <= TINY_PROMPTS and result["round_index"] == 2
    assert all(positive(v) for v in result["parts_s"].values())
    assert result["sum_parts_s"] == pytest.approx(sum(result["parts_s"].values()), abs=1e-3)
    assert phases_fit_in(result["round_phases_s"], result["round_s"])
    # one repeat: the reported ratios are the ratios of the reported times (rounded to 4 digits)
    assert result["round_over_parts"] == pytest.approx(result["round_s"] / result["sum_parts_s"], rel=1e-2)
    without_save = (result["round_s"] - result["round_phases_s"]["save"]) / result["sum_parts_s"]
    assert result["round_without_save_over_parts"] == pytest.approx(without_save, rel=1e-2)
    assert result["round_without_save_over_parts"] < result["round_over_parts"]
    # π_t's log-probs taken from the sampling pass agree with the scoring forward
    assert result["candidates"]["logps_from_sampling_max_abs_diff"] < 1e-3


def test_round_cost_child_reports_memory():
    result = round_cost.run_child(round_cost.parser().parse_args(TINY + ["--child"]))
    phases = {k: v for k, v in result.items() if k.endswith("_s") and k != "round_s"}
    assert set(phases) == {"generate_s", "score_s", "pair_s", "train_s", "save_s"}
    assert phases_fit_in(phases, result["round_s"])
    # RSS in MiB (ru_maxrss is KiB on Linux: a unit slip would show as ~1000x), and the round's growth is bounded
    assert 50 < result["maxrss_before_round_mib"] < 64 * 1024
    growth = result["maxrss_after_round_mib"] - result["maxrss_before_round_mib"]
    assert growth < ROUND_RSS_GROWTH_LIMIT_MIB, f"a tiny round grew the peak RSS by {growth:.0f} MiB"


def test_vs_naive_trains_both_arms_on_the_same_pairs(capsys):
    result = vs_naive.main(TINY[:-1] + ["2"])  # two repetitions: A/B then B/A
    assert result["same_pairs"] is True and 0 < result["num_pairs"] <= TINY_PROMPTS
    assert all(positive(v) for v in result["medians"].values())
    assert result["cream_over_naive"] == result["medians"]["ratio"]
    # a fraction of the pairs (benchmarks/README.md: DPOTrainer re-tokenizes decoded texts, which need not round-trip)
    assert 0 <= result["dpo_trainer_token_identical_fraction"] <= 1


def test_ab_switch_freeze_gc_is_exact(capsys):
    result = ab_switch.main(TINY + ["--field", "freeze_gc"])
    assert result["same_pairs_every_repeat"] is True and result["pairs_bit_identical_every_repeat"] is True
    assert result["max_abs_diff_ref_chosen_logps"] == 0.0
    medians = result["medians"]
    assert phases_fit_in({k: v for k, v in medians.items() if k.startswith("off_") and k != "off_s"}, medians["off_s"])
    assert phases_fit_in({k: v for k, v in medians.items() if k.startswith("on_") and k != "on_s"}, medians["on_s"])
    assert result["on_over_off"] == pytest.approx(medians["on_s"] / medians["off_s"], rel=1e-2)


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
