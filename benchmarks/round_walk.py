"""Measure one CREAM round's walk through the code (issue 24, "one name and one hop per step").

Runs a 2-round full fine-tuning run on the tiny test model under `sys.setprofile` and reports, for round 2:

- ``files``: the `trl_cream` modules whose Python functions ran inside the round;
- ``save_chain``: the `trl_cream` frames between the round and the first ``save_pretrained`` (the save of M3);
- ``trainer_store_calls``: calls from ``trainer/trainer.py`` into ``runs/store.py`` and back (callbacks included);
- ``args_any``: functions of the package that take the whole config as ``args: Any`` (a source scan).

``PYTHONPATH=. .venv/bin/python benchmarks/round_walk.py``
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import QUESTIONS, cream_args, perturbed, tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402

import trl_cream  # noqa: E402
from trl_cream import CreamTrainer  # noqa: E402

PACKAGE = Path(trl_cream.__file__).parent
ROUND = 2
# A function signature that takes the config as `args: Any` (not `*args`; the `on_*` signatures are TrainerCallback's).
ARGS_ANY = re.compile(r"def (?!on_)(\w+)\((?:[^()]|\([^()]*\))*?(?<![*\w])args: Any\b", re.S)


def _module(frame: FrameType) -> str | None:
    path = Path(frame.f_code.co_filename)
    return str(path.relative_to(PACKAGE)) if path.is_relative_to(PACKAGE) else None


class Walk:
    def __init__(self) -> None:
        self.active = False
        self.files: set[str] = set()
        self.save_chain: list[str] | None = None
        self.edges = {"trainer->store": 0, "store->trainer": 0}

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "_run_round" or code.co_name == "run_round":
            round_index = frame.f_locals.get("t", getattr(frame.f_locals.get("state"), "t", None))
            self.active = round_index == ROUND
        if not self.active:
            return
        module = _module(frame)
        if module is not None:
            self.files.add(module)
        caller = _module(frame.f_back) if frame.f_back is not None else None
        if caller == "trainer/trainer.py" and module == "runs/store.py":
            self.edges["trainer->store"] += 1
        if caller == "runs/store.py" and module == "trainer/trainer.py":
            self.edges["store->trainer"] += 1
        if code.co_name == "save_pretrained" and self.save_chain is None and module is None:
            chain, f = [], frame.f_back
            while f is not None and f.f_code.co_name not in ("_run_round", "run_round"):
                if _module(f) is not None:
                    chain.append(f"{_module(f)}:{f.f_code.co_name}")
                f = f.f_back
            self.save_chain = list(reversed(chain))


def args_any() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for match in ARGS_ANY.finditer(path.read_text()):
            found.append(f"{path.relative_to(PACKAGE)}:{match.group(1)}")
    return found


def main() -> dict[str, Any]:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    walk = Walk()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=cream_args(Path(tmp)), train_dataset=prompts,
            processing_class=tokenizer,
        )  # fmt: skip
        sys.setprofile(walk)
        try:
            trainer.train()
        finally:
            sys.setprofile(None)
    functions = args_any()
    result = {
        "files": sorted(walk.files),
        "num_files": len(walk.files),
        "save_chain": walk.save_chain,
        "save_hops": len(walk.save_chain or []),
        "trainer_store_calls": walk.edges,
        "args_any": functions,
        "num_args_any": len(functions),
        "num_args_any_files": len({f.split(":")[0] for f in functions}),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
