"""One boolean `CreamConfig` switch of issue #9 item 4, off and on, inside CREAM's real round, alternated in one run.

Runs round 2 (as `round_cost.py` does) with the field off and on, off/on then on/off, `--repeats` times in this
process. Prints the medians of both arms' round and phase times, on / off, whether both arms produced the same
candidates and pairs, and the largest difference between their stored π_t log-probs (the DPO reference).

Usage:
    python benchmarks/ab_switch.py --field freeze_gc --model tiny
    python benchmarks/ab_switch.py --field policy_logps_from_sampling --model smollm2 --prompts 4 --new_tokens 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from round_cost import build_setup, cream_round, median_dict, parser  # noqa: E402

FIELDS = ("freeze_gc", "policy_logps_from_sampling")


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The same round with the boolean `CreamConfig` field ``a.field`` off and on, alternated (off/on, then on/off)
    ``a.repeats`` times in this process: medians, on / off, whether both gave the same
    pairs (same prompt, chosen and rejected candidates) and whether every stored number is identical."""
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(a, Path(tmp))
        rows, same_pairs, identical, max_policy_diff = [], [], [], 0.0
        for rep in range(a.repeats):
            results = {}
            for flag in (False, True) if rep % 2 == 0 else (True, False):
                out = Path(tmp) / f"ab_{rep}_{flag}"
                results[flag] = cream_round(setup, out, copy.deepcopy(setup.models["M2"]), **{a.field: flag})
            off, on = results[False], results[True]
            index = [("prompt_index", "chosen_index", "rejected_index")] * 2
            same_pairs.append(
                off.candidates == on.candidates and [off.pairs[k] for k in index[0]] == [on.pairs[k] for k in index[1]]
            )
            identical.append(off.pairs.to_list() == on.pairs.to_list())
            diff = torch.tensor(off.pairs["ref_chosen_logps"]) - torch.tensor(on.pairs["ref_chosen_logps"])
            max_policy_diff = max(max_policy_diff, diff.abs().max().item() if len(diff) else 0.0)
            rows.append(
                {"off_s": off.seconds, "on_s": on.seconds, "ratio": on.seconds / off.seconds}
                | {f"off_{k}_s": v for k, v in off.phases.items()}
                | {f"on_{k}_s": v for k, v in on.phases.items()}
            )
    return {
        "benchmark": "ab_switch",
        "field": a.field,
        "model": a.model,
        "prompts": a.prompts,
        "num_generations": a.num_generations,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "medians": median_dict(rows),
        "on_over_off": round(statistics.median(r["ratio"] for r in rows), 4),
        "same_pairs_every_repeat": all(same_pairs),
        "pairs_bit_identical_every_repeat": all(identical),
        "max_abs_diff_ref_chosen_logps": max_policy_diff,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    p.add_argument("--field", choices=FIELDS, required=True, help="the CreamConfig switch to turn off and on")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result = run(a)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
