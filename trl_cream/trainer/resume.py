"""Opening a CREAM run: check (or record) its manifest and, on resume, find what an earlier attempt finished.

Every phase of a round is saved as soon as it is computed (`trl_cream.runs.store`) and loaded instead of recomputed
when an earlier attempt finished it (`PhaseStore.load_or_compute`). Sampling is seeded with ``seed + t`` and training
with ``seed + t`` again, so a phase redone after a crash gives the same result as in an uninterrupted run. What is
decided once, when the run opens, is returned as a [`RunStart`].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from ..modeling import adapters
from ..runs.gate import RunGate, RunInProgress, RunLock
from ..runs.store import PhaseStore
from ..runs.weights import load_adapter_weights, load_full_weights

logger = logging.getLogger(__name__)


@dataclass
class RunStart:
    """Where a run starts.

    Attributes:
        done (`int`): rounds finished by an earlier attempt (``M<iteration_index(done + 1)>`` is saved).
        resumed (`bool`): whether an earlier attempt's policy was found (the policy must be reloaded from it).
        chosen_checkpoint (`tuple[int, Path]` or `None`): an intra-round Trainer checkpoint named explicitly by
            ``resume_from_checkpoint``, with its round.
        round_metrics (`list[dict]`): the finished rounds' metrics.
        sft_metrics (`dict`): the SFT stage's metrics, if it ran.
        gradient_accumulation_steps (`int` or `None`): the accumulation that keeps the run's global batch on this
            resume's number of processes, when it differs from the configured one (`elastic_accumulation`).
    """

    done: int = 0
    resumed: bool = False
    chosen_checkpoint: tuple[int, Path] | None = None
    round_metrics: list[dict[str, Any]] = field(default_factory=list)
    sft_metrics: dict[str, Any] = field(default_factory=dict)
    gradient_accumulation_steps: int | None = None

    @property
    def resumed_round(self) -> int:
        """The round a resume continues in (0 for a fresh run)."""
        return self.done + 1 if self.resumed else 0

    @property
    def train_steps(self) -> int:
        """Optimizer steps of the finished rounds."""
        return sum(int(m.get("train_steps", 0)) for m in self.round_metrics)

    def trainer_checkpoint(self, t: int, store: PhaseStore) -> Path | None:
        """The intra-round Trainer checkpoint round ``t`` continues from: the one named explicitly, else the latest
        one of the round a resume starts in; `None` for every other round."""
        if self.chosen_checkpoint is not None and self.chosen_checkpoint[0] == t:
            return self.chosen_checkpoint[1]
        return store.last_trainer_checkpoint(t) if t == self.resumed_round else None

    def restores_previous(self, t: int) -> bool:
        """Whether round ``t`` must reload π_{t−1} from disk first (LoRA's ``previous`` adapter is in memory only
        when this process ran round ``t − 1``)."""
        return t > 1 and t == self.resumed_round


@contextmanager
def run_lock(output_dir: str | Path, accelerator: Accelerator) -> Iterator[RunLock]:
    """Hold the run folder's lock (`trl_cream.runs.gate.RunLock`) for the block: the main process takes it, at once,
    before anything is written; when another process holds it, every process raises `RunInProgress`."""
    lock = RunLock(output_dir)
    refusal: str | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunInProgress as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal is not None:
        raise RunInProgress(refusal)
    try:
        yield lock
    finally:
        lock.release()


def open_run(
    store: PhaseStore,
    manifest: dict[str, Any],
    accelerator: Accelerator,
    resume_from_checkpoint: str | bool | None,
    num_rounds: int,
    overwrite: bool,
    lock: RunLock | None = None,
) -> RunStart:
    """Check/record the manifest; on resume, find the finished rounds and load their metrics.

    Every process checks the manifest; only the main one writes it, after all have read the old one. A refused
    start leaves the folder as it was (``lock``'s own files are removed).
    """
    resume = bool(resume_from_checkpoint)
    gate = RunGate(store.output_dir, is_main=store.is_main)
    manifest["world"] = {"num_processes": accelerator.num_processes}
    accumulation = None
    try:
        chosen = chosen_checkpoint(store, num_rounds, resume_from_checkpoint)
        if resume:
            deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
            accumulation = elastic_accumulation(
                _readable(gate), manifest, accelerator.num_processes, deepspeed, store.output_dir
            )
        clear = gate.check(manifest, resume=resume, overwrite=overwrite)  # every process
    except Exception:
        if lock is not None:
            lock.release(tidy=True)
        raise
    accelerator.wait_for_everyone()  # all have read the old manifest before the main process replaces it
    if not resume:
        gate.record(manifest, clear)
        accelerator.wait_for_everyone()
    if not (resume and store.has_iteration(store.iteration(1))):
        return RunStart(chosen_checkpoint=chosen, gradient_accumulation_steps=accumulation)
    done = store.last_complete_round(num_rounds)
    for k in sorted({store.iteration(max(done, 1)), store.iteration(done + 1)}):  # π_t and π_{t−1}, before loading
        store.verify_iteration(k, _damaged_iteration_advice(store, k))
    for t in range(1, done + 1):
        store.drop_trainer_checkpoints(t)  # left over when a crash came right after M<t+1> was saved
    logger.info("Resuming the CREAM run in %s after %d finished round(s).", store.output_dir, done)
    return RunStart(
        done=done,
        resumed=True,
        chosen_checkpoint=chosen,
        round_metrics=[store.load_round_metrics(t) for t in range(1, done + 1)],
        sft_metrics=store.load_sft_metrics(),
        gradient_accumulation_steps=accumulation,
    )


def _readable(gate: RunGate) -> dict[str, Any] | None:
    try:
        return gate.read_manifest()
    except ValueError:  # a damaged manifest: `RunGate.check` names it
        return None


def elastic_accumulation(
    old: dict[str, Any] | None,
    manifest: dict[str, Any],
    num_processes: int,
    deepspeed: bool = False,
    folder: str | Path = "output_dir",
) -> int | None:
    """On resume, the gradient accumulation that keeps the run's global batch (per-device batch × accumulation ×
    processes) on ``num_processes`` processes; `None` when nothing changes.

    When the process count differs and the global batch divides, ``manifest`` is given the run's recorded process
    count and accumulation (so that the manifest check passes) and the new accumulation is returned; when it does not
    divide (or under DeepSpeed, whose engine fixes the batch), a `ValueError` names both counts and the global batch.
    """
    world = (old or {}).get("world")
    if not isinstance(world, dict):  # a run recorded before the process count was: nothing to compare
        manifest.pop("world", None)
        return None
    before = int(world.get("num_processes", num_processes))
    old_config, config = old.get("config") or {}, manifest.get("config") or {}
    batch, accumulation = old_config.get("per_device_train_batch_size"), old_config.get("gradient_accumulation_steps")
    if before == num_processes or batch != config.get("per_device_train_batch_size") or not accumulation:
        return None  # the same count, or another per-device batch (the manifest check names that)
    total, per_step = batch * accumulation * before, batch * num_processes
    if total % per_step or deepspeed:
        why = "DeepSpeed's engine fixes the batch" if deepspeed else f"{total} is not a multiple of {per_step}"
        raise ValueError(
            f"Cannot resume the run in {folder} on {num_processes} process(es): "
            f"it was started on {before} with a global batch of {total} (per_device_train_batch_size={batch} x "
            f"gradient_accumulation_steps={accumulation} x {before} processes), which {num_processes} process(es) "
            f"cannot keep ({why}). Resume on {before} processes, or on a count P with {total} a multiple of "
            f"{batch} x P."
        )
    steps = total // per_step
    if config.get("gradient_accumulation_steps") not in (accumulation, steps):
        return None  # another global batch asked for: the manifest check refuses it
    manifest["world"], config["gradient_accumulation_steps"] = dict(world), accumulation
    logger.warning(
        "Resuming on %d process(es) instead of %d: gradient_accumulation_steps=%d (was %d) keeps the run's global "
        "batch of %d. A round whose candidates were not saved yet is sampled again with this process count's per-rank "
        "seeds, so it draws other candidates than the first attempt would have.",
        num_processes, before, steps, accumulation, total,
    )  # fmt: skip
    return steps


def chosen_checkpoint(
    store: PhaseStore, num_rounds: int, resume_from_checkpoint: str | bool | None
) -> tuple[int, Path] | None:
    """(round, folder) of an explicitly given intra-round Trainer checkpoint; None for `True` or output_dir."""
    if not isinstance(resume_from_checkpoint, (str, Path)):
        return None
    path, out = Path(resume_from_checkpoint).resolve(), store.output_dir.resolve()
    if path == out:
        return None
    for t in range(1, num_rounds + 1):
        folder = store.trainer_checkpoint_dir(t).resolve()
        if path.parent == folder and (path / "trainer_state.json").exists():
            return t, path
    raise ValueError(
        f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: a CREAM run resumes from its output_dir "
        f"({out}) or from a checkpoint under {out}/rounds/round_<t>/trainer_checkpoints/; pass True to resume "
        "from the latest state found there."
    )


def restore_policy(model: nn.Module, use_peft: bool, path: Path) -> None:
    """Load ``M<k>`` saved in ``path`` into the (unwrapped) policy: the full weights, or the policy adapter."""
    logger.info("Resuming: the policy is reloaded from %s", path)
    if use_peft:
        load_adapter_weights(model, adapters.policy_adapter_name(model), path)
    else:
        load_full_weights(model, path)


def unpushed_iterations(store: PhaseStore, done: int) -> list[int]:
    """The saved iterations up to ``M<iteration_index(done + 1)>`` whose push marker is missing, each checked against
    the digests recorded when it was saved (nothing damaged is pushed)."""
    indices = range(store.iteration(1), store.iteration(done + 1) + 1)
    found = [k for k in indices if store.has_iteration(k) and not store.is_pushed(k)]
    for k in found:
        store.verify_iteration(k, _damaged_iteration_advice(store, k))
    return found


def _damaged_iteration_advice(store: PhaseStore, index: int) -> str:
    """What to do about a damaged ``M<index>``: delete it and resume (the round that saved it is redone)."""
    t = index - store.first_iteration
    redo = f"round {t} is redone from its saved phases" if t > 0 else "it is saved again from the model you pass"
    return (
        f"Restore the file, or delete {store.iteration_dir(index)} and resume with resume_from_checkpoint=True "
        f"({redo}; the later iterations are then trained again)."
    )
