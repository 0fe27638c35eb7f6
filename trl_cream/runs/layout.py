"""Where a CREAM run lives on disk: every path under ``output_dir`` is built here, and nowhere else.

```
output_dir/
  M<k>/                                   the policy after k − 1 rounds (M1: the starting policy, after SFT)
  rounds/round_<t>/                       round t's phases (`trl_cream.runs.store`) and its metrics.json
    trainer_checkpoints/checkpoint-<s>    intra-round Trainer checkpoints (save_strategy)
  cream_state/manifest.json               the run's configuration and data fingerprints
  cream_state/sft.json                    the SFT stage's metrics
  cream_state/pushed/M<k>.json            written once M<k> is fully on the Hub
  cream_state/checksums.json              SHA-256 of every saved phase file and of every file of every M<k>
  cream_state/stale_iterations.json       M<k> folders an overwritten run left, kept until this run replaces them
  cream_state/run.lock                    held by the process running the run (one run per folder at a time)
```

Round ``t`` starts from ``π_t = M<iteration_index(t)>`` and saves ``M<iteration_index(t + 1)>``; its ``π_{t−1}`` is
``M<iteration_index(t − 1)>``. That one function is the only place the ``M<k>`` numbering is computed.
"""

from __future__ import annotations

import re
from pathlib import Path

FIRST_ITERATION = 1  # M1 = SFT(M0) is the policy round 1 starts from (Algorithm 1)
STATE_DIR = "cream_state"
MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
ITERATION_NAME = re.compile(r"M(\d+)")
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def iteration_index(t: int, first: int = FIRST_ITERATION) -> int:
    """``k`` of ``M<k> = π_t``, the policy round ``t`` starts from (``t = 1``: the starting policy ``M<first>``).

    Round ``t`` saves ``M<iteration_index(t + 1)>`` and compares against ``π_{t−1} = M<iteration_index(t − 1)>``.
    """
    return first + t - 1


def round_of_iteration(index: int, first: int = FIRST_ITERATION) -> int:
    """The round whose training produced ``M<index>`` (0 for the starting policy): the inverse of
    ``iteration_index(t + 1)``."""
    return index - first


def iteration_name(index: int) -> str:
    """``M<index>``: the folder, Hub branch and push-marker name of an iteration."""
    return f"M{index}"


def parse_iteration_name(name: str) -> int | None:
    """``k`` for a name ``M<k>``, else `None`."""
    match = ITERATION_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def parse_trainer_checkpoint(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else `None`."""
    match = _TRAINER_CHECKPOINT.fullmatch(name)
    return int(match.group(1)) if match else None


class RunLayout:
    """The paths of the run in ``output_dir``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    @property
    def state_dir(self) -> Path:
        return self.output_dir / STATE_DIR

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / MANIFEST_NAME

    @property
    def sft_metrics_path(self) -> Path:
        return self.state_dir / "sft.json"

    @property
    def rounds_dir(self) -> Path:
        return self.output_dir / "rounds"

    def iteration_dir(self, index: int) -> Path:
        return self.output_dir / iteration_name(index)

    def iterations(self) -> list[int]:
        """The ``k`` of every ``M<k>`` folder, ascending."""
        if not self.output_dir.is_dir():
            return []
        found = (parse_iteration_name(p.name) for p in self.output_dir.iterdir() if p.is_dir())
        return sorted(k for k in found if k is not None)

    @property
    def stale_iterations_path(self) -> Path:
        return self.state_dir / "stale_iterations.json"

    def push_marker_path(self, index: int) -> Path:
        return self.state_dir / "pushed" / f"{iteration_name(index)}.json"

    def round_dir(self, t: int) -> Path:
        return self.rounds_dir / f"round_{t}"

    def round_metrics_path(self, t: int) -> Path:
        return self.round_dir(t) / "metrics.json"

    def pairing_path(self, t: int) -> Path:
        return self.round_dir(t) / "pairing.json"

    def trainer_checkpoint_dir(self, t: int) -> Path:
        return self.round_dir(t) / "trainer_checkpoints"
