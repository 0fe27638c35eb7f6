"""`trl-cream study` end to end at its smallest size: one shared M1, SRLM and CREAM over two seeds, the report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cream_args, tiny_llama, tiny_tokenizer

from trl_cream.recipes.study import STUDY_SIZES, StudyArguments, run_study
from trl_cream.recipes.study_report import compare


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(root / "m0")
    tokenizer.save_pretrained(root / "m0")
    args = cream_args(
        root / "out", num_generations=STUDY_SIZES["tiny"]["num_generations"], sft_num_train_epochs=1.0,
        sft_learning_rate=1e-2, sft_max_length=256, max_length=256,
    )  # fmt: skip
    tasks = ["arc_easy", "openbookqa"]
    study = StudyArguments(size="tiny", model=str(root / "m0"), seeds=[0, 1], tasks=tasks, lora_r=4)
    return run_study(study, args), root / "out"


def test_study_runs_both_methods_from_one_m1_and_reports(study_run):
    results, out = study_run
    # SFT ran once: one M1, and every run's M1 is that adapter (no per-run SFT).
    assert (out / "M1" / "adapter_model.safetensors").exists()
    m1 = (out / "M1" / "adapter_model.safetensors").read_bytes()
    for method in ("srlm", "cream"):
        for seed in (0, 1):
            run = out / method / f"seed{seed}"
            assert (run / "M1" / "adapter_model.safetensors").read_bytes() == m1
            assert (run / "M2" / "adapter_model.safetensors").exists() and (run / "M3").is_dir()
            rounds = results["rounds"][method][str(seed)]
            assert [r["round"] for r in rounds] == [1, 2]
    # SRLM trains with C = 1 (no consistency weighting), CREAM with its measured C.
    assert all(r["consistency"] == 1.0 for s in results["rounds"]["srlm"].values() for r in s)

    table1 = results["summary"]["table1"]
    assert {"M0", "M1", "srlm M2", "srlm M3", "cream M2", "cream M3"} <= set(table1)
    for row in table1.values():
        assert set(row) == {"arc_easy", "openbookqa", "Average"}
        assert row["arc_easy"]["n"] == STUDY_SIZES["tiny"]["eval_mc"]
        assert 0 <= row["Average"]["mean"] <= 1 and row["arc_easy"]["stderr"] > 0
    assert table1["cream M2"]["Average"]["num_seeds"] == 2
    for method in ("srlm", "cream"):
        for pair in ("M2 vs M1", "M3 vs M2"):
            c = results["summary"]["table2"][method][pair]["consistency"]
            assert 0 <= c["mean"] <= 1 and c["num_seeds"] == 2
            moved = results["summary"]["table2"][method][pair]["weight_change"]
            assert moved["num_seeds"] == 2 and moved["mean"] >= 0
            if method == "srlm":  # C = 1: every SRLM round with a pair moves the adapter (CREAM's may not at C = 0.5)
                assert moved["mean"] > 0
        for kind in ("mean_logp", "sum_logp"):
            round1 = results["summary"]["round1_baseline"][method][kind]
            assert 0 <= round1["consistency"]["mean"] <= 1 and -1 <= round1["kendall_tau"]["mean"] <= 1
            per_run = results["round1_baseline"][method]["0"][kind]
            assert per_run["consistency"] == pytest.approx((per_run["kendall_tau"] + 1) / 2)
        # The trainer ranked round 1 with the default mean_logp baseline: its own τ is the study's recomputation.
        for seed in ("0", "1"):
            trainer_tau = results["rounds"][method][seed][0]["kendall_tau_mean"]
            assert trainer_tau == pytest.approx(results["round1_baseline"][method][seed]["mean_logp"]["kendall_tau"])
    quantities = [row["quantity"] for row in results["summary"]["comparison"]]
    assert "average accuracy M3 (%)" in quantities and "C M3 vs M2" in quantities

    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1] and saved["settings"]["num_held_out_prompts"] == 2
    markdown = (out / "results.md").read_text()
    paired = {row["quantity"]: row for row in results["summary"]["paired"]}
    assert paired["average accuracy M2 (%)"]["seeds"] == ["0", "1"]
    assert len(paired["average accuracy M2 (%)"]["differences"]) == 2
    for heading in ("Table 1", "Table 2", "Training rounds", "CREAM vs SRLM", "paired by seed", "Round-1 baseline"):
        assert heading in markdown
    assert (out / "results.png").stat().st_size > 1000


def test_comparison_is_judged_against_the_seed_spread():
    def stat(mean, std):
        return {"mean": mean, "std": std, "num_seeds": 3, "stderr": 0.01}

    table2 = {
        m: {p: {"consistency": stat(c, 0.01), "kendall_tau": stat(2 * c - 1, 0.02)} for p in ("M2 vs M1", "M3 vs M2")}
        for m, c in (("cream", 0.80), ("srlm", 0.70))
    }
    table1 = {"cream M2": {"Average": stat(0.400, 0.05)}, "srlm M2": {"Average": stat(0.390, 0.05)}}
    rows = {row["quantity"]: row for row in compare(table1, table2)}
    assert rows["C M2 vs M1"]["difference"] == pytest.approx(0.10)
    assert rows["C M2 vs M1"]["seed_spread"] == pytest.approx((2 * 0.01**2 / 3) ** 0.5)
    assert rows["C M2 vs M1"]["verdict"].startswith("CREAM higher")
    assert "within seed noise" in rows["average accuracy M2 (%)"]["verdict"]


def test_bad_study_arguments_fail_before_any_work(tmp_path):
    args = cream_args(tmp_path)
    with pytest.raises(ValueError, match="methods"):
        run_study(StudyArguments(size="tiny", model="unused", methods=["dpo"]), args)
    with pytest.raises(ValueError, match="seeds"):
        run_study(StudyArguments(size="tiny", model="unused", seeds=[1, 1]), args)
    with pytest.raises(ValueError, match="num_iterations 3"):
        run_study(StudyArguments(size="tiny", model="unused"), cream_args(tmp_path, num_iterations=3))
    with pytest.raises(ValueError, match="--size 'huge'"):
        run_study(StudyArguments(size="huge", model="unused"), args)


def test_merged_lora_checkpoint_scores_like_the_adapter(tokenizer, m0):
    """The study evaluates accuracy on merged copies of its LoRA checkpoints: same option log-probs, faster."""
    import copy

    from peft import LoraConfig, get_peft_model

    from trl_cream.evaluation.loglikelihood import score_options

    rows = [{"question": q, "choices": ["yes", "no", "maybe so"], "answer": "A"} for q in ("Is it?", "Why not?")]
    model = get_peft_model(copy.deepcopy(m0), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter = torch.tensor(score_options(model.eval(), tokenizer, rows, show_progress=False))
    merged = torch.tensor(score_options(model.merge_and_unload(), tokenizer, rows, show_progress=False))
    base = torch.tensor(score_options(m0.eval(), tokenizer, rows, show_progress=False))
    torch.testing.assert_close(merged, adapter, atol=1e-4, rtol=1e-5)
    assert (base - adapter).abs().max() > 1e-2  # the adapter does change the scores


def test_study_command_takes_the_size_preset_n_unless_given(monkeypatch):
    import trl_cream.recipes.study as study_module
    from trl_cream import cli

    seen = []
    monkeypatch.setattr(study_module, "run_study", lambda study, args: seen.append((study.size, args.num_generations)))
    assert cli.main(["study", "--size", "tiny", "--output_dir", "unused"]) == 0
    assert cli.main(["study", "--size", "large", "--num_generations", "3", "--output_dir", "unused"]) == 0
    assert cli.main(["study", "--output_dir", "unused"]) == 0
    assert seen == [("tiny", 2), ("large", 3), ("default", STUDY_SIZES["default"]["num_generations"])]


def test_summarise_aggregates_over_seeds_with_standard_errors():
    import math
    import statistics

    from trl_cream.recipes.study_report import render_study_markdown, summarise

    def task(acc, n=200):
        return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "n": n}

    def pair(c):
        return {"consistency": {"mean": c}, "kendall_tau": {"mean": 2 * c - 1}}

    accs = {"srlm": [0.40, 0.42, 0.44], "cream": [0.45, 0.47, 0.52]}
    runs = {
        m: {str(s): {it: {"a": task(v), "b": task(0.5)} for it in ("M2", "M3")} for s, v in enumerate(vals)}
        for m, vals in accs.items()
    }
    consistency = {
        m: {str(s): {"M2 vs M1": pair(c), "M3 vs M2": pair(c)} for s, c in enumerate(cs)}
        for m, cs in (("srlm", [0.5, 0.6, 0.7]), ("cream", [0.8, 0.8, 0.9]))
    }
    round1 = {m: {str(s): {k: {"consistency": 0.1, "kendall_tau": -0.8} for k in ("mean_logp", "sum_logp")}
                  for s in range(3)} for m in accs}  # fmt: skip
    lengths = {"srlm": [40.0, 44.0, 48.0], "cream": [10.0, 12.0, 14.0]}  # round 2's chosen length per seed
    rounds = {
        m: {str(s): [{"round": 1, "consistency": 1.0 if m == "srlm" else 0.25, "kendall_tau_mean": -0.5,
                      "chosen_length_mean": 12.0, "rejected_length_mean": 10.0},
                     {"round": 2, "consistency": 1.0 if m == "srlm" else 0.4 + 0.1 * s, "kendall_tau_mean": 0.1 * s,
                      "chosen_length_mean": lengths[m][s], "rejected_length_mean": 30.0}] for s in range(3)}
        for m in accs
    }  # fmt: skip
    results = {
        "accuracy": {"shared": {"M0": {"a": task(0.3), "b": task(0.5)}}, "runs": runs},
        "consistency": consistency, "round1_baseline": round1, "rounds": rounds,
    }  # fmt: skip
    summary = summarise(results)
    assert set(summary["rounds"]["cream"]) == {"1", "2"}
    cream2 = summary["rounds"]["cream"]["2"]
    assert (cream2["consistency"]["mean"], cream2["consistency"]["std"]) == (pytest.approx(0.5), pytest.approx(0.1))
    assert summary["rounds"]["srlm"]["2"]["chosen_length_mean"]["mean"] == pytest.approx(44.0)
    assert summary["rounds"]["srlm"]["1"]["consistency"]["std"] == 0.0
    row = summary["table1"]["cream M3"]
    assert row["a"]["mean"] == pytest.approx(statistics.fmean(accs["cream"]))
    assert row["a"]["std"] == pytest.approx(statistics.stdev(accs["cream"])) and row["a"]["num_seeds"] == 3
    assert row["a"]["stderr"] == pytest.approx(statistics.fmean(task(v)["stderr"] for v in accs["cream"]))
    m0 = summary["table1"]["M0"]["Average"]
    assert m0["mean"] == pytest.approx(0.4) and m0["std"] == 0.0
    assert m0["stderr"] == pytest.approx(math.hypot(task(0.3)["stderr"], task(0.5)["stderr"]) / 2)
    c = summary["table2"]["srlm"]["M3 vs M2"]["consistency"]
    assert (c["mean"], c["std"]) == (pytest.approx(0.6), pytest.approx(0.1))
    verdicts = {r["quantity"]: r["verdict"] for r in summary["comparison"]}
    assert verdicts["C M2 vs M1"].startswith("CREAM higher")
    results.update(summary=summary, settings=dict(
        model="m", size="default", seeds=[0, 1, 2], num_train_prompts=16, num_iterations=2, num_generations=4,
        eval_mode="loglikelihood", eval_mc=200, num_held_out_prompts=8, tasks=["a", "b"], methods=["srlm", "cream"],
    ))  # fmt: skip
    paired = {r["quantity"]: r for r in summary["paired"]}
    # Seed by seed, average of tasks a and b (b is 0.5 for both): (Δa + 0) / 2 in points = 2.5, 2.5, 4.0.
    assert paired["average accuracy M3 (%)"]["differences"] == pytest.approx([2.5, 2.5, 4.0])
    assert paired["average accuracy M3 (%)"]["std"] == pytest.approx(statistics.stdev([2.5, 2.5, 4.0]))
    assert paired["C M2 vs M1"]["differences"] == pytest.approx([0.3, 0.2, 0.2])
    markdown = render_study_markdown(results)
    assert "| cream M3 | 48.00 ± 3.61 (se " in markdown
    assert "| 2 | SRLM | 1.00 ± 0.00 | 0.10 ± 0.10 | 44.00 ± 4.00 | 30.00 ± 0.00 |" in markdown
    assert "paired by seed" in markdown and "| C M2 vs M1 | +0.300, +0.200, +0.200 | +0.233 | 0.058 |" in markdown
    for table in markdown.split("\n\n"):  # every row of a table has as many cells as its header (no stray "|")
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in rows}) <= 1, rows


def _exact_signed_rank(d: list[float]) -> tuple[float, float]:
    """An independent exact Wilcoxon signed-rank test by enumeration: zero differences dropped, tied magnitudes at
    their average rank, all ``2^n`` sign patterns equally likely; statistic ``min(W+, W−)``, two-sided p."""
    nonzero = [x for x in d if x != 0]
    order = sorted(abs(x) for x in nonzero)
    ranks = [
        sum(i + 1 for i, m in enumerate(order) if m == abs(x)) / sum(1 for m in order if m == abs(x)) for x in nonzero
    ]
    w_plus = sum(r for r, x in zip(ranks, nonzero) if x > 0)
    null = [sum(r for j, r in enumerate(ranks) if signs >> j & 1) for signs in range(2 ** len(ranks))]
    low = sum(w <= w_plus + 1e-9 for w in null) / len(null)
    high = sum(w >= w_plus - 1e-9 for w in null) / len(null)
    return min(w_plus, sum(ranks) - w_plus), min(1.0, 2 * min(low, high))


@pytest.mark.parametrize(
    "cream, srlm",
    [
        ([0.455, 0.47, 0.52], [0.44, 0.43, 0.45]),  # 3 seeds, all positive
        ([0.61, 0.58, 0.70, 0.52, 0.66, 0.49, 0.73], [0.60, 0.61, 0.65, 0.50, 0.62, 0.515, 0.66]),  # mixed signs
        ([-0.2, 0.1, -0.45, 0.3, -0.05], [0.0, 0.0, 0.0, 0.0, 0.0]),  # τ-like values
        ([0.1, -0.1, 0.2, 0.3, 0.0, 0.25], [0.0] * 6),  # a tie in magnitude and a zero difference
    ],
)
def test_paired_test_agrees_with_the_textbook_formulas(cream, srlm):
    """The paired t-test against ``mean / (std / √k)`` with Student's t CDF, and the exact Wilcoxon signed-rank test
    against a brute-force enumeration of the sign patterns (both written here, independently of scipy.stats)."""
    import math
    import statistics

    from scipy.special import stdtr

    from trl_cream.recipes.study_report import paired_test

    d = [c - s for c, s in zip(cream, srlm)]
    ours = paired_test(d)
    k = len(d)
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(k))
    assert ours["t"] == pytest.approx(t, rel=1e-9) and ours["df"] == k - 1
    assert ours["p_ttest"] == pytest.approx(2 * stdtr(k - 1, -abs(t)), rel=1e-9)
    statistic, p = _exact_signed_rank(d)
    assert ours["wilcoxon_statistic"] == pytest.approx(statistic)
    assert ours["p_wilcoxon"] == pytest.approx(p, rel=1e-9)
    assert ours["std"] == pytest.approx(statistics.stdev(d))


def test_paired_test_edge_cases():
    from trl_cream.recipes.study_report import paired_test

    three = paired_test([1.0, 2.0, 3.0])
    assert three["p_wilcoxon"] == pytest.approx(0.25)  # the smallest two-sided exact p with 3 seeds
    same = paired_test([0.5, 0.5, 0.5])  # no spread: t undefined, reported as NaN rather than ±inf
    assert same["std"] == 0.0 and same["t"] != same["t"] and same["p_ttest"] != same["p_ttest"]
    assert paired_test([0.0, 0.0])["p_wilcoxon"] != paired_test([0.0, 0.0])["p_wilcoxon"]  # all ties: NaN


def test_round1_baselines_use_the_round_statistics(tmp_path) -> None:
    """The study's round-1 τ is `round_statistics`' (fully tied prompts left out), from a round's saved candidates."""
    from datasets import Dataset

    from trl_cream.core.consistency import round_statistics
    from trl_cream.core.rewards import baseline_rewards
    from trl_cream.recipes.study import _round1_baselines

    reward = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    initial = torch.tensor([[-3.0, -1.0, -2.0], [-1.0, -2.0, -3.0], [-2.0, -4.0, -1.0]])
    lengths = torch.tensor([[1, 2, 1], [1, 1, 1], [2, 1, 1]])
    Dataset.from_dict(
        {"reward": reward.flatten().tolist(), "logp_initial": initial.flatten().tolist(),
         "num_tokens": lengths.flatten().tolist()}
    ).save_to_disk(str(tmp_path / "candidates"))  # fmt: skip
    out = _round1_baselines(tmp_path, 3)
    for kind, got in out.items():
        stats = round_statistics(reward, baseline_rewards(None, initial, lengths, kind))
        assert got["num_defined"] == stats["num_defined"] == 2
        assert got["kendall_tau"] == pytest.approx(stats["kendall_tau"]["mean"])
        assert got["consistency"] == pytest.approx(stats["consistency"]["mean"])


def test_study_plot_keeps_coinciding_methods_apart_and_c_bars_within_0_1():
    from trl_cream.recipes.study_report import PAIRS, study_figure

    same = {"mean": 0.9, "std": 0.3}  # SRLM and CREAM identical; mean + std would reach 1.2
    average = {"Average": {"mean": 0.4, "std": 0.01, "stderr": 0.02}}
    table1 = {"M0": average, "M1": average, **{f"{m} {k}": average for m in ("srlm", "cream") for k in ("M2", "M3")}}
    results = {
        "settings": {"methods": ["srlm", "cream"]},
        "summary": {
            "table1": table1,
            "table2": {m: {p: {"consistency": same} for p in PAIRS} for m in ("srlm", "cream")},
        },
    }
    acc_axes, c_axes = study_figure(results).axes
    for axes in (acc_axes, c_axes):
        lines = [container.lines[0] for container in axes.containers]
        xs = [tuple(line.get_xdata()) for line in lines]
        assert len(xs) == 2 and xs[0] != xs[1]  # side by side, not on top of each other
        assert lines[0].get_linestyle() != lines[1].get_linestyle()
    for container in c_axes.containers:
        for segment in container.lines[2][0].get_segments():
            assert 0.0 <= min(segment[:, 1]) and max(segment[:, 1]) <= 1.0 + 1e-12
