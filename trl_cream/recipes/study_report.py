"""Aggregation and report of `trl-cream study`: Table 1/2 over seeds, CREAM vs SRLM, results.{md,json,png}."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.report import write_results

TABLE2_METRICS: tuple[tuple[str, str], ...] = (
    ("consistency", "C"),
    ("kendall_tau", "Kendall τ"),
    ("spearman_normalized", "Spearman (ρ+1)/2"),
    ("top_order", "TopOrder"),
)
PAIRS = ("M2 vs M1", "M3 vs M2")
# Per training round, from the trainer's round metrics: the C the loss used (1 for SRLM), τ between the rankings by
# r and by r' (computed for SRLM too, unused), and the mean length of the chosen and rejected candidates.
ROUND_METRICS: tuple[tuple[str, str], ...] = (
    ("consistency", "C used by the loss"),
    ("kendall_tau_mean", "τ (r vs r')"),
    ("chosen_length_mean", "chosen length (tokens)"),
    ("rejected_length_mean", "rejected length (tokens)"),
)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample std (ddof = 1; 0 for a single value) of the finite values; NaN when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "num_seeds": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "num_seeds": len(finite)}


def _with_average(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = {task: dict(r) for task, r in per_task.items()}
    if rows:
        k = len(rows)
        rows["Average"] = {
            "accuracy": sum(r["accuracy"] for r in rows.values()) / k,
            "stderr": math.sqrt(sum(r["stderr"] ** 2 for r in rows.values())) / k,
            "n": sum(r["n"] for r in rows.values()),
        }
    return rows


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 (mean ± std over seeds, mean stderr), Table 2 (mean ± std over seeds of the per-run means),
    the round-1 baseline comparison and CREAM vs SRLM relative to the seed spread."""
    shared, runs = results["accuracy"]["shared"], results["accuracy"]["runs"]
    table1: dict[str, dict[str, Any]] = {}
    for iteration, per_task in shared.items():
        rows = _with_average(per_task)
        table1[iteration] = {
            t: {"mean": r["accuracy"], "std": 0.0, "stderr": r["stderr"], "n": r["n"]} for t, r in rows.items()
        }
    for method, seeds in runs.items():
        for iteration in ("M2", "M3"):
            per_seed = [_with_average(by_it[iteration]) for by_it in seeds.values()]
            if not per_seed:
                continue
            table1[f"{method} {iteration}"] = {
                task: {
                    **_mean_std([s[task]["accuracy"] for s in per_seed]),
                    "stderr": statistics.fmean(s[task]["stderr"] for s in per_seed),
                    "n": per_seed[0][task]["n"],
                }
                for task in per_seed[0]
            }
    table2 = {
        method: {
            pair: {
                **{
                    key: _mean_std([s[pair][key]["mean"] for s in seeds.values() if pair in s and s[pair].get(key)])
                    for key, _ in TABLE2_METRICS
                },
                "weight_change": _mean_std([s[pair].get("weight_change") for s in seeds.values() if pair in s]),
            }
            for pair in PAIRS
        }
        for method, seeds in results["consistency"].items()
    }
    round1 = {
        method: {
            kind: {key: _mean_std([r[kind][key] for r in seeds.values()]) for key in ("consistency", "kendall_tau")}
            for kind in ("mean_logp", "sum_logp")
        }
        for method, seeds in results["round1_baseline"].items()
    }
    return {
        "table1": table1, "table2": table2, "round1_baseline": round1, "comparison": compare(table1, table2),
        "paired": paired_comparison(results), "rounds": _rounds(results.get("rounds", {})),
    }  # fmt: skip


def _rounds(rounds: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per method and training round, mean ± std over seeds of the `ROUND_METRICS` of each run's round."""
    table: dict[str, dict[str, Any]] = {}
    for method, seeds in rounds.items():
        by_round: dict[int, list[Mapping[str, Any]]] = {}
        for run in seeds.values():
            for r in run:
                by_round.setdefault(int(r["round"]), []).append(r)
        table[method] = {
            str(t): {key: _mean_std([r.get(key) for r in rs]) for key, _ in ROUND_METRICS}
            for t, rs in sorted(by_round.items())
        }
    return table


def _verdict(diff: float, spread: float) -> str:
    if not math.isfinite(diff):
        return "not measured"
    if not math.isfinite(spread):
        return "no seed spread to compare against (one seed per method?)"
    if spread == 0:
        return "identical" if diff == 0 else "differs, with no spread over seeds"
    ratio = abs(diff) / spread
    if ratio < 2:
        return f"within seed noise (abs(Δ) = {ratio:.1f} × the spread)"
    return f"{'CREAM' if diff > 0 else 'SRLM'} higher, abs(Δ) = {ratio:.1f} × the spread"


def compare(table1: Mapping[str, Any], table2: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CREAM − SRLM on average accuracy (M2, M3) and on C and τ per pair, with the seed spread of the difference,
    ``sqrt(std_cream² / k_cream + std_srlm² / k_srlm)`` (the standard error of a difference of seed means)."""
    rows = []

    def add(quantity: str, cream: Mapping[str, Any] | None, srlm: Mapping[str, Any] | None) -> None:
        if not cream or not srlm:
            return
        diff = cream["mean"] - srlm["mean"]
        spread = math.sqrt(
            sum((s["std"] ** 2) / s["num_seeds"] for s in (cream, srlm) if s.get("num_seeds") and s["std"] == s["std"])
        )
        rows.append(
            {"quantity": quantity, "cream": cream["mean"], "srlm": srlm["mean"], "difference": diff,
             "seed_spread": spread, "verdict": _verdict(diff, spread)}
        )  # fmt: skip

    for iteration in ("M2", "M3"):
        add(
            f"average accuracy {iteration} (%)",
            _percent(table1.get(f"cream {iteration}", {}).get("Average")),
            _percent(table1.get(f"srlm {iteration}", {}).get("Average")),
        )
    for pair in PAIRS:
        for key, label in TABLE2_METRICS[:2]:
            cream, srlm = (table2.get(m, {}).get(pair, {}).get(key) for m in ("cream", "srlm"))
            add(f"{label} {pair}", cream, srlm)
    return rows


def paired_test(differences: Sequence[float]) -> dict[str, Any]:
    """Paired statistics of per-seed differences ``d_s = CREAM_s − SRLM_s``: their mean and sample std (ddof = 1),
    the paired t-test (`scipy.stats.ttest_rel` of the two arms, i.e. ``t = mean / (std / √k)`` with ``k − 1``
    degrees of freedom, two-sided) and the exact two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon` with
    ``method="exact"``: zero differences dropped, ties at average ranks, statistic ``min(W+, W−)``).

    With 3 seeds the smallest possible Wilcoxon p is 0.25: it cannot reject at 5 %, and only the t-test (which
    assumes normal differences) can. Undefined quantities are NaN (no spread for t; no non-zero difference for
    Wilcoxon).
    """
    from scipy import stats

    d = [float(x) for x in differences if x is not None and math.isfinite(x)]
    k = len(d)
    out: dict[str, Any] = {"differences": d, "num_seeds": k, "mean": statistics.fmean(d) if d else math.nan}
    out["std"] = statistics.stdev(d) if k > 1 else math.nan
    out.update(t=math.nan, df=k - 1, p_ttest=math.nan, wilcoxon_statistic=math.nan, p_wilcoxon=math.nan)
    if k > 1 and out["std"] > 0:
        ttest = stats.ttest_rel(d, [0.0] * k)
        out.update(t=float(ttest.statistic), p_ttest=float(ttest.pvalue))
    if any(x != 0 for x in d):
        wilcoxon = stats.wilcoxon(d, method="exact")
        out.update(wilcoxon_statistic=float(wilcoxon.statistic), p_wilcoxon=float(wilcoxon.pvalue))
    return out


def _average_accuracy(per_task: Mapping[str, Mapping[str, Any]]) -> float:
    return statistics.fmean(r["accuracy"] for r in per_task.values()) if per_task else math.nan


def paired_comparison(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CREAM − SRLM seed by seed (both start from the same M1 and sample the same round-1 candidates for a seed):
    average accuracy of M2 and M3 (in points) and C and τ of each pair, with `paired_test` on the differences."""
    runs, consistency = results["accuracy"]["runs"], results["consistency"]
    if "cream" not in runs or "srlm" not in runs:
        return []
    seeds = [s for s in runs["cream"] if s in runs["srlm"]]
    rows = []
    for iteration in ("M2", "M3"):
        diffs = [
            100 * (_average_accuracy(runs["cream"][s][iteration]) - _average_accuracy(runs["srlm"][s][iteration]))
            for s in seeds
        ]
        rows.append({"quantity": f"average accuracy {iteration} (%)", "seeds": seeds, **paired_test(diffs)})
    for pair in PAIRS:
        for key, label in TABLE2_METRICS[:2]:

            def value(method: str, seed: str, pair: str = pair, key: str = key) -> float:
                stat = consistency.get(method, {}).get(seed, {}).get(pair, {}).get(key) or {}
                return math.nan if stat.get("mean") is None else stat["mean"]

            diffs = [value("cream", s) - value("srlm", s) for s in seeds]
            if any(math.isfinite(x) for x in diffs):
                rows.append({"quantity": f"{label} {pair}", "seeds": seeds, **paired_test(diffs)})
    return rows


def _percent(stat: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not stat:
        return None
    return {**stat, "mean": 100 * stat["mean"], "std": 100 * stat["std"]}


def _fmt(stat: Mapping[str, Any] | None, scale: float = 1.0, se: bool = False) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "–"
    text = f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"
    return text + (f" (se {scale * stat['stderr']:.2f})" if se and "stderr" in stat else "")


def render_study_markdown(results: Mapping[str, Any]) -> str:
    summary, settings = results["summary"], results["settings"]
    tasks = list(settings["tasks"]) + ["Average"]
    lines = [
        "# SRLM vs CREAM from one shared M1",
        "",
        f"Model {settings['model']}; size `{settings['size']}`; seeds {settings['seeds']}; "
        f"{settings['num_train_prompts']} training prompts over {settings['num_iterations']} rounds, "
        f"N = {settings['num_generations']}; eval mode `{settings['eval_mode']}`, "
        f"{settings['eval_mc']} questions per task; {settings['num_held_out_prompts']} held-out prompts for Table 2.",
        "",
        "## Table 1: accuracy (%), mean ± std over seeds (se = mean standard error of one run, as lm-eval)",
        "",
        "| Iteration | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for iteration, row in summary["table1"].items():
        lines.append(f"| {iteration} | " + " | ".join(_fmt(row.get(t), 100, se=True) for t in tasks) + " |")
    lines += ["", "M0 and M1 are shared by every run (evaluated once: no seed spread).", ""]
    lines += ["## Table 2: ranking consistency on held-out prompts, mean ± std over seeds", ""]
    headers = [h for _, h in TABLE2_METRICS] + ["weights moved ‖Δθ‖/‖θ‖"]
    lines += ["| Iterations | Method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for pair in PAIRS:
        for method, pairs in summary["table2"].items():
            cells = [_fmt(pairs.get(pair, {}).get(key)) for key, _ in TABLE2_METRICS]
            moved = pairs.get(pair, {}).get("weight_change") or {}
            cells.append(f"{_num(moved.get('mean'), '.1e')} ± {_num(moved.get('std'), '.1e')}")
            lines.append(f"| {pair} | {method.upper()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Weights moved: relative change of the LoRA adapter from the older checkpoint to the newer. C near 1 with "
        "weights that barely moved means the round changed nothing, not that it was consistent.",
    ]
    lines += _round_lines(summary.get("rounds", {}))
    lines += ["", "## CREAM vs SRLM", "", "| Quantity | CREAM | SRLM | Δ | seed spread of Δ | verdict |"]
    lines += ["|---" * 6 + "|"]
    for row in summary["comparison"]:
        lines.append(
            f"| {row['quantity']} | {row['cream']:.3f} | {row['srlm']:.3f} | {row['difference']:+.3f} | "
            f"{row['seed_spread']:.3f} | {row['verdict']} |"
        )
    lines += ["", "Seed spread of Δ = sqrt(std²_CREAM / k + std²_SRLM / k): the two methods treated as unpaired.", ""]
    lines += _paired_lines(summary.get("paired", []))
    lines += [
        "",
        "## Round-1 baseline: round 1's ranking (r = log π_1 − log π_0) against π_0's likelihood",
        "",
        "Computed from the same round-1 candidates and scores of every run; mean ± std over seeds.",
        "",
        "| Method | C, mean_logp (length-normalised) | τ, mean_logp | C, sum_logp (summed) | τ, sum_logp |",
        "|---|---|---|---|---|",
    ]
    for method, kinds in summary["round1_baseline"].items():
        keys = ("consistency", "kendall_tau")
        cells = [_fmt(kinds[kind][key]) for kind in ("mean_logp", "sum_logp") for key in keys]
        lines.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time per phase (s): {results.get('timings', {})}", ""]
    return "\n".join(lines)


def _num(value: Any, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _round_lines(rounds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not rounds:
        return []
    headers = [h for _, h in ROUND_METRICS]
    lines = ["", "## Training rounds, mean ± std over seeds", ""]
    lines += ["| Round | Method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for t in sorted({t for per_round in rounds.values() for t in per_round}, key=int):
        for method, per_round in rounds.items():
            if t in per_round:
                cells = [_fmt(per_round[t][key]) for key, _ in ROUND_METRICS]
                lines.append(f"| {t} | {method.upper()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Round t turns M_t into M_{t+1} on its own prompts. SRLM's loss uses C = 1; its τ is measured, not used.",
    ]
    return lines


def _paired_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    seeds = ", ".join(str(s) for s in rows[0]["seeds"])
    lines = [
        "### CREAM vs SRLM, paired by seed",
        "",
        "Both methods start each seed from the same M1 and sample the same round-1 candidates, so the per-seed "
        "differences d = CREAM − SRLM are paired. Paired t-test: t = mean(d) / (sd(d) / √k), Student's t with k − 1 "
        "degrees of freedom (`scipy.stats.ttest_rel`); Wilcoxon signed-rank, exact (`scipy.stats.wilcoxon`), whose "
        "smallest possible two-sided p with 3 seeds is 0.25.",
        "",
        f"| Quantity | d per seed ({seeds}) | mean d | sd of d | t (df) | p, paired t | p, Wilcoxon |",
        "|---" * 7 + "|",
    ]
    for row in rows:
        per_seed = ", ".join(_num(x, "+.3f") for x in row["differences"])
        lines.append(
            f"| {row['quantity']} | {per_seed} | {_num(row['mean'], '+.3f')} | {_num(row['std'], '.3f')} | "
            f"{_num(row['t'], '+.2f')} ({row['df']}) | {_num(row['p_ttest'], '.3f')} | "
            f"{_num(row['p_wilcoxon'], '.3f')} |"
        )
    return lines


def clipped_yerr(means: Sequence[float], errors: Sequence[float], low: float, high: float) -> list[list[float]]:
    """Asymmetric error bars ``[below, above]`` that stop at ``low`` / ``high`` (C lives in [0, 1])."""
    below = [m - max(low, m - e) if math.isfinite(m) else 0.0 for m, e in zip(means, errors)]
    above = [min(high, m + e) - m if math.isfinite(m) else 0.0 for m, e in zip(means, errors)]
    return [below, above]


# Per method: a small x shift and its own line style, so that coinciding methods stay visible side by side.
_METHOD_STYLES = (
    {"linestyle": "-", "marker": "o"},
    {"linestyle": "--", "marker": "s"},
    {"linestyle": ":", "marker": "^"},
)


def study_figure(results: Mapping[str, Any]) -> Any:
    """The study's figure: average accuracy per iteration and C per pair, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = results["summary"]
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    acc_axes, c_axes = figure.subplots(1, 2)
    methods = list(results["settings"]["methods"])
    for k, method in enumerate(methods):
        shift, style = 0.06 * (k - (len(methods) - 1) / 2), _METHOD_STYLES[k % len(_METHOD_STYLES)]
        names = ["M0", "M1", f"{method} M2", f"{method} M3"]
        stats = [summary["table1"].get(n, {}).get("Average") for n in names]
        xs = [i for i, s in enumerate(stats) if s]
        errors = [100 * max(stats[i]["std"], stats[i]["stderr"]) for i in xs]
        acc_axes.errorbar(
            [x + shift for x in xs], [100 * stats[i]["mean"] for i in xs], yerr=errors, capsize=3,
            label=method.upper(), **style,
        )  # fmt: skip
        pairs = summary["table2"].get(method, {})
        cs = [pairs.get(p, {}).get("consistency", {}) for p in PAIRS]
        means = [c.get("mean", math.nan) for c in cs]
        c_axes.errorbar(
            [x + shift for x in range(len(PAIRS))], means,
            yerr=clipped_yerr(means, [c.get("std", 0) or 0 for c in cs], 0.0, 1.0), capsize=3,
            label=method.upper(), **style,
        )  # fmt: skip
    acc_axes.set(xticks=range(4), xticklabels=["M0", "M1", "M2", "M3"], ylabel="average accuracy (%)")
    acc_axes.set_title("Average accuracy (± max(seed std, standard error))")
    acc_axes.legend()
    c_axes.set(xticks=range(len(PAIRS)), xticklabels=list(PAIRS), ylim=(0, 1.05), ylabel="consistency C")
    c_axes.set_title("Ranking consistency on held-out prompts (± seed std, within [0, 1])")
    c_axes.legend()
    return figure


def plot_study(results: Mapping[str, Any], path: Path) -> Path:
    study_figure(results).savefig(path, dpi=120)
    return path


def write_study_report(results: Mapping[str, Any], output_dir: Path) -> dict[str, Path]:
    return write_results(results, output_dir, render_study_markdown(results), plot_study)
