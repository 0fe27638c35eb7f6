"""The learning-rate warm-up of a round (and of the SFT stage), in whole steps that never use up the stage.

Transformers' linear warm-up runs its first step at learning rate 0 and turns a ratio into ``ceil(ratio * steps)``
steps, so a CREAM round of one optimizer step with the paper's ``warmup_steps=0.1`` ran that step at lr 0 and learnt
nothing. Here a ratio rounds *down* to whole steps, and the warm-up always leaves at least one step after it, which
runs at the full learning rate: a round of fewer than ``1 / ratio`` steps has no warm-up at all.
"""

from __future__ import annotations

import math

from trl import SFTConfig


def whole_step_warmup(warmup_steps: float, num_training_steps: int) -> int:
    """Warm-up steps of a stage of ``num_training_steps`` optimizer steps.

    Args:
        warmup_steps: a ratio of the stage's steps when below 1 (rounded down), else a number of steps.
        num_training_steps: the optimizer steps of the stage (one CREAM round, or the SFT stage).

    Returns:
        At most ``num_training_steps - 1`` steps, so that the last warm-up step is followed by a step at the full
        learning rate (0 for a one-step stage).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 (a ratio below 1, or a number of steps).")
    steps = math.floor(num_training_steps * warmup_steps) if warmup_steps < 1 else int(warmup_steps)
    return max(0, min(steps, num_training_steps - 1))


class SFTStageConfig(SFTConfig):
    """TRL's SFTConfig with the same whole-step warm-up as the CREAM rounds."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return whole_step_warmup(self.warmup_steps, num_training_steps)
