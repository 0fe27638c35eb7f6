"""Whether a run may start in ``output_dir``: the folder's manifest against the new run's, and what a fresh start
clears. `PhaseStore` (`trl_cream.runs.store`) then stores the phases of the run this lets in.

One run at a time: `RunLock` holds an OS lock on ``cream_state/run.lock`` for the life of a run (main process
only); a second process pointed at the same folder is refused before it writes anything. The OS drops the lock when
the process dies, so a killed run leaves nothing stale.

A fresh start is refused in a folder that holds a different run that finished a phase (unless
``overwrite_output_dir``), a resume in one whose manifest differs or is missing. What a start clears is only what the
runs' manifests list (`trl_cream.runs.integrity.owned_paths`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .files import _remove, atomic_write_json, read_json
from .integrity import (
    Checksums,
    DamagedFile,
    iteration_range,
    load_checked,
    owned_paths,
    recorded_paths,
    stale_iterations,
)
from .layout import RunLayout
from .manifest import manifest_differences

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
OWNER_NAME = "run.owner.json"  # pid and host of the lock's holder (the lock file itself is truncated by each opener)


class RunInProgress(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive OS lock on ``output_dir/cream_state/run.lock``, taken at once or refused.

    Args:
        output_dir: the run's folder.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.layout = RunLayout(output_dir)
        self.path = self.layout.state_dir / LOCK_NAME
        self.owner_path = self.layout.state_dir / OWNER_NAME
        self._lock: FileLock | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock, or raise `RunInProgress` naming the folder and the holder's pid and host."""
        if self.held:
            return
        self._created = [p for p in (self.layout.output_dir, self.layout.state_dir) if not p.exists()]
        self.layout.state_dir.mkdir(parents=True, exist_ok=True)
        created_file = not self.path.exists()
        lock = FileLock(str(self.path), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except Timeout:
            raise RunInProgress(
                f"output_dir={str(self.layout.output_dir)!r}: a CREAM run is in progress there ({self._holder()} "
                f"holds {self.path}). One run folder holds one run at a time: wait for that run to finish (or stop "
                "it), then resume it with resume_from_checkpoint=True, or choose another output_dir."
            ) from None
        self._lock = lock
        if created_file:
            self._created.append(self.path)
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.owner_path.write_text(json.dumps(owner) + "\n", encoding="utf-8")
        self._created.append(self.owner_path)

    def _holder(self) -> str:
        try:
            owner = json.loads(self.owner_path.read_text(encoding="utf-8"))
            return f"process {int(owner['pid'])} on host {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self, tidy: bool = False) -> None:
        """Drop the lock; with ``tidy`` also remove the lock files and folders it created (a refused start leaves
        the folder as it found it)."""
        if self._lock is None:
            return
        self.owner_path.unlink(missing_ok=True)
        if tidy:
            for path in reversed(self._created):
                if path.is_file():
                    path.unlink(missing_ok=True)
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        self._lock.release()
        self._lock = None


class RunGate:
    """Decides whether a run may start in ``output_dir`` and records the one that does.

    Args:
        output_dir: the run's folder.
        is_main: whether this process writes (the others only check).
    """

    def __init__(self, output_dir: str | Path, is_main: bool = True) -> None:
        self.layout = RunLayout(output_dir)
        self.output_dir = self.layout.output_dir
        self.is_main = is_main
        self._previous_manifest: dict[str, Any] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.layout.manifest_path

    def holds_a_run(self) -> bool:
        return self.manifest_path.exists() or self.layout.rounds_dir.exists()

    def read_manifest(self) -> dict[str, Any] | None:
        """The folder's manifest, `None` when there is none; `DamagedFile` when it cannot be read."""
        if not self.manifest_path.exists():
            return None
        manifest = load_checked(self.manifest_path, lambda: read_json(self.manifest_path))
        if not isinstance(manifest, dict):
            raise DamagedFile(f"{self.manifest_path} holds no manifest (a JSON object)")
        return manifest

    def finished_any_phase(self, manifest: dict[str, Any] | None) -> bool:
        """Whether the run in the folder finished a phase (SFT, or any phase of a round): a run that finished none
        (a failed start) is replaced by a new start without ``overwrite_output_dir``."""
        first, rounds = iteration_range(manifest)
        if self.layout.sft_metrics_path.exists():
            return True
        if any(self.layout.iteration_dir(k).is_dir() for k in range(first + 1, first + rounds + 1)):
            return True
        results = ("samples", "scores.safetensors", "pairs", "metrics.json")
        return any((self.layout.round_dir(t) / name).exists() for t in range(1, rounds + 1) for name in results)

    def finished(self, manifest: dict[str, Any] | None) -> bool:
        """Whether the folder's run saved every iteration its manifest plans (``M<first>`` … ``M<first+rounds>``)."""
        first, rounds = iteration_range(manifest)
        stale = stale_iterations(self.layout)
        return rounds > 0 and all(
            self.layout.iteration_dir(k).is_dir() and k not in stale for k in range(first, first + rounds + 1)
        )

    def check(self, manifest: dict[str, Any], resume: bool, overwrite: bool) -> bool:
        """Check ``manifest`` against the folder's run, writing nothing (every process, before `record`).

        Returns:
            Whether a previous run must be cleared before this one starts.

        Raises:
            ValueError: resuming with a different manifest, from a folder without a run or with a damaged manifest;
                starting afresh in a folder that holds a different run that finished a phase, or ``M<k>`` folders
                no run recorded (unless ``overwrite``).
        """
        try:
            old, damaged = self.read_manifest(), None
        except DamagedFile as error:
            old, damaged = None, error
        self._previous_manifest = old
        if resume:
            if damaged is not None:
                raise ValueError(
                    f"Cannot resume the run in {self.output_dir}: {damaged}, so it cannot be checked that this is "
                    "the same run. Restore the file, or start over with overwrite_output_dir=True (CLI: "
                    "--overwrite_output_dir; it removes the run's M<k>, rounds/ and cream_state/ only)."
                )
            if old is None:
                raise ValueError(
                    f"resume_from_checkpoint: {self.output_dir} holds no CREAM run to resume ({self.manifest_path} "
                    "is missing). Drop resume_from_checkpoint to start a new run there."
                )
            diffs = manifest_differences(old, manifest)
            if diffs:
                raise ValueError(
                    f"Cannot resume the run in {self.output_dir}: its manifest differs in {len(diffs)} field(s): "
                    + "; ".join(diffs)
                    + ". Resume with the original settings, models and data, or start a new run in another "
                    "output_dir."
                )
            logger.info("Resuming the CREAM run in %s", self.output_dir)
            return False
        if self.holds_a_run():
            if damaged is not None:
                diffs = [f"{damaged}"]
            else:
                diffs = manifest_differences(old, manifest) if old is not None else ["no manifest (an older run)"]
            replaceable = not self.finished_any_phase(old or manifest)
            if not diffs and not overwrite and self.finished(old):
                first, rounds = iteration_range(old)
                raise ValueError(
                    f"output_dir={str(self.output_dir)!r} holds a finished CREAM run with these settings (M{first} to "
                    f"M{first + rounds} are saved): starting it again would replace them. Nothing is left to do; "
                    "pass resume_from_checkpoint=True to finish what a resume would (unpushed iterations), "
                    "overwrite_output_dir=True to train it again from the start, or choose another output_dir."
                )
            if diffs and not overwrite and not replaceable:
                raise ValueError(
                    f"output_dir={str(self.output_dir)!r} already holds a different CREAM run ("
                    + "; ".join(diffs[:10])
                    + "). Resume it with resume_from_checkpoint=True (same settings), choose a new output_dir, or "
                    "set overwrite_output_dir=True to replace it."
                )
            if self.is_main:
                logger.warning(
                    "output_dir %s holds %s; starting over and replacing its iterations and rounds "
                    "(pass resume_from_checkpoint=True to keep finished phases).",
                    self.output_dir,
                    "an identical run"
                    if not diffs
                    else "a run that finished no phase"
                    if replaceable
                    else "another run (overwrite_output_dir=True)",
                )
            return True
        stray = [p.name for p in owned_paths(self.layout, [manifest])[::3] if p.is_dir()]
        if stray and not overwrite:
            raise ValueError(
                f"output_dir={str(self.output_dir)!r} holds {', '.join(stray)} but no CREAM run recorded them (no "
                f"{self.manifest_path}): this run would replace them. Move them away, choose another output_dir, or "
                "set overwrite_output_dir=True to replace them."
            )
        return bool(stray)

    def record(self, manifest: dict[str, Any], clear: bool) -> None:
        """A fresh start: clear a previous run if `check` said so, and write the manifest (main process only)."""
        if not self.is_main:
            return
        if clear:
            first, rounds = iteration_range(manifest)
            keep = [k for k in range(first, first + rounds + 1) if self.layout.iteration_dir(k).is_dir()]
            self.clear([self._previous_manifest, manifest], keep=keep)
            if keep:  # an old M<k> stays until this run saves its own M<k> (never a moment with neither)
                atomic_write_json(self.layout.stale_iterations_path, keep)
        atomic_write_json(self.manifest_path, manifest)

    def clear(self, manifests: list[dict[str, Any] | None] | None = None, keep: list[int] = ()) -> None:
        """Remove what the runs of ``manifests`` wrote (default: the folder's readable manifest): their state, the
        ``M<k>`` and ``rounds/round_<t>`` folders their first iteration and number of rounds span, and those
        ``checksums.json`` lists files of (a longer run whose manifest was lost); ``rounds/`` only once empty.
        The ``M<k>`` of ``keep`` stay. Nothing else in ``output_dir`` is touched."""
        if manifests is None:
            try:
                manifests = [self.read_manifest()]
            except DamagedFile:
                manifests = []
        kept = {self.layout.iteration_dir(k).name for k in keep}
        owned = owned_paths(self.layout, manifests)
        leftovers = recorded_paths(self.layout, Checksums(self.output_dir, self.layout.state_dir, atomic_write_json))
        for path in [*owned, *leftovers]:
            if path.name not in kept:
                _remove(path)
        state = self.layout.state_dir
        for path in state.iterdir() if state.is_dir() else []:
            if path.name not in (LOCK_NAME, OWNER_NAME):  # the lock of the run now starting stays
                _remove(path)
        rounds = self.layout.rounds_dir
        if rounds.is_dir() and not any(rounds.iterdir()):
            rounds.rmdir()
