"""Run a plan of CREAM runs in one process launch, under whatever engine the launch set up (tests/test_engines.py).

    accelerate launch --config_file cfg.yaml tests/engine_launch.py tests/engine_plan.py PLAN.json

Each step of the JSON plan is either ``{"kind": "injected", "out": DIR, "mode": "full"|"lora", "batch": B}``, the
2-round run of tests/dist_worker.py with injected candidates, or ``{"kind": "script", "path": SCRIPT, "argv": [...],
"out": DIR}``, a script run unchanged (``runpy``). After each step every rank writes what its trainer ran on to
``DIR/engine/rank<r>.json`` (see `engine_launch.engine_report`). Start-up dominates a tiny run, so one launch
runs several steps.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dist_worker  # noqa: E402
import engine_launch  # noqa: E402


def run_step(step: dict) -> None:
    out = Path(step["out"])
    before = len(engine_launch.TRAINERS)
    engines_before = len(engine_launch.ENGINES)
    if step["kind"] == "injected":
        dist_worker.run(out, step["mode"], int(step["batch"]))
    else:
        argv = sys.argv
        sys.argv = [step["path"], *step["argv"]]
        try:
            runpy.run_path(step["path"], run_name="__main__")
        finally:
            sys.argv = argv
    trainer = engine_launch.TRAINERS[-1]
    assert len(engine_launch.TRAINERS) == before + 1, "each step builds one CreamTrainer"
    report = engine_launch.engine_report(trainer)
    report["deepspeed_engines"] = engine_launch.ENGINES[engines_before:]
    path = out / "engine" / f"rank{trainer.accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


def main() -> None:
    for step in json.loads(Path(sys.argv[1]).read_text()):
        run_step(step)


if __name__ == "__main__":
    main()
