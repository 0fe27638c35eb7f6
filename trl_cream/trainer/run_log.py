"""One run for the logging integrations (`report_to`): one step axis and one logging folder for the whole CREAM run.

Transformers sees each round as its own ``Trainer.train()``: its step counter restarts at 0, TensorBoard opens its
writer wherever the first log happens (``./runs`` in the working folder when that is before training starts) and
Trackio ends its run at every ``on_train_end``. Here:

- `StepAxis` numbers the optimizer steps of the whole run: the SFT stage's steps 1..S, then round 1's S+1..S+n1,
  and so on. A round's own metrics (``cream/consistency``, τ, pairs, timings) are logged at the step where its
  training starts (its first step, S+1 for round 1), so every metric's steps increase. (Transformers itself logs
  the bookkeeping values ``epoch`` and ``cream/round`` twice at a stage's last step: with that step and with the
  end-of-training summary.)
- `attach` points TensorBoard at ``output_dir/runs/<date>_<host>`` (unless ``TENSORBOARD_LOGGING_DIR`` is set) and
  wraps the integrations whose end-of-training hook closes the writer / finishes the run in `RunEndDeferred`, a
  `TrainerCallback` that holds that hook back until the run ends (`end_run`).
- `SFTLogForwarder` sends the SFT stage's logs into the CREAM trainer's integrations, as ``sft/<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
from transformers.trainer_callback import CallbackHandler

# Integrations whose `on_train_end` ends the run (closes the writer, finishes the Trackio run).
_RUN_ENDING = ("TensorBoardCallback", "TrackioCallback")


class StepAxis:
    """Optimizer steps of the finished stages (SFT, rounds), and the step that logs go to."""

    def __init__(self) -> None:
        self.offset = 0
        self._pinned: int | None = None
        self._last_round_step = 0

    def round_start(self) -> int:
        """The step of a round's own metrics: its first optimizer step (one past the last round's, if that round ran
        no step)."""
        self._last_round_step = max(self.offset + 1, self._last_round_step + 1)
        return self._last_round_step

    def finish_stage(self, steps: int) -> None:
        """A stage (the SFT stage or a round) ran ``steps`` optimizer steps."""
        self.offset += int(steps)

    def step(self, in_stage: int) -> int:
        """The run's step of a log made at the stage's step ``in_stage`` (or the pinned step)."""
        return self._pinned if self._pinned is not None else self.offset + in_stage

    @contextmanager
    def pinned(self, step: int) -> Iterator[None]:
        """Log at ``step`` whatever the Trainer's own counter says (a round's metrics, the SFT stage's logs)."""
        saved, self._pinned = self._pinned, step
        try:
            yield
        finally:
            self._pinned = saved

    @contextmanager
    def applied(self, state: Any) -> Iterator[None]:
        """``state.global_step`` is the run's step while the integrations log."""
        saved = state.global_step
        state.global_step = self.step(saved)
        try:
            yield
        finally:
            state.global_step = saved


class RunEndDeferred(TrainerCallback):
    """A logging integration whose end-of-training hook (closing the TensorBoard writer, finishing the Trackio run)
    waits for the end of the CREAM run: every other event is passed on as it comes; a round's ``on_train_end`` is
    not (a round's end is not the run's end), and `end_run` passes the last one on."""

    def __init__(self, integration: TrainerCallback) -> None:
        self.integration = integration

    def end_run(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The run's end: the integration's own ``on_train_end``."""
        self.integration.on_train_end(args, state, control, **kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A round's end: held back."""


def _forward(event: str) -> Callable[..., Any]:
    def forward(self: RunEndDeferred, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.integration, event)(*args, **kwargs)

    forward.__name__ = event
    return forward


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_") and name != "on_train_end"]:
    setattr(RunEndDeferred, _event, _forward(_event))


def attach(handler: CallbackHandler, output_dir: str) -> None:
    """One TensorBoard folder under ``output_dir``; the integrations that end the run at ``on_train_end`` are wrapped
    in `RunEndDeferred`, in place, so that they end it once (`end_run`)."""
    folder = os.path.join(output_dir, default_logdir())
    for i, callback in enumerate(handler.callbacks):
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = folder
        if type(callback).__name__ in _RUN_ENDING:
            handler.callbacks[i] = RunEndDeferred(callback)


def end_run(
    handler: CallbackHandler, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
) -> None:
    """Call the integrations' deferred ``on_train_end`` once, after the last round."""
    for callback in handler.callbacks:
        if isinstance(callback, RunEndDeferred):
            callback.end_run(args, state, control, **kwargs)


class SFTLogForwarder(TrainerCallback):
    """Sends the SFT trainer's logs to ``log(logs, step)`` (the CREAM trainer's integrations), as ``sft/<name>``."""

    def __init__(self, log: Callable[[dict[str, float], int], None]) -> None:
        self._log = log

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs:
            numbers = {f"sft/{k}": float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            self._log(numbers, state.global_step)
