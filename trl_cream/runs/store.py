"""Durable CREAM runs: atomic writes, the run manifest and the per-phase store that `train()` resumes from.

Every phase of a round writes its result under ``output_dir`` as soon as it is computed, to a temporary name that
is renamed into place (``os.replace``), so a crash leaves either the whole result or nothing:

| phase | result | format |
|---|---|---|
| sampling | ``rounds/round_<t>/samples/`` (prompt and candidate token ids) | `datasets` folder |
| scoring | ``rounds/round_<t>/scores.safetensors`` (log-probs under π_t, π_0, π_{t−1}; lengths) | safetensors |
| pairing | ``rounds/round_<t>/pairs/`` (+ ``pairing.json``, ``candidates/``) | `datasets` folder + JSON |
| training | ``rounds/round_<t>/trainer_checkpoints/checkpoint-<step>`` when ``save_strategy`` makes them | Trainer |
| saving | ``M<t+1>/`` (round complete), then ``rounds/round_<t>/metrics.json`` | safetensors + JSON |

``cream_state/manifest.json`` (`trl_cream.runs.manifest`) records the configuration (secrets removed), dataset
fingerprints and seeds; whether a run may start in a folder (a resume with a different manifest, or a fresh start in a
folder holding another run, is refused) is decided by `trl_cream.runs.gate.RunGate`. Nothing here writes or reads a
pickle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from datasets import Dataset, load_from_disk
from safetensors import safe_open
from safetensors.torch import load_file

from ..core.labelling import RoundScores
from .files import _remove, atomic_dir, atomic_write_json, read_json, save_dataset, save_tensors
from .integrity import Checksums, DamagedFile, load_checked, stale_iterations
from .layout import FIRST_ITERATION, RunLayout, iteration_index, parse_trainer_checkpoint

logger = logging.getLogger(__name__)


T = TypeVar("T")


# ---------------------------------------------------------------- the phase store
class PhaseStore:
    """Where a run's phases are saved and found again (paths: `trl_cream.runs.layout.RunLayout`).

    Args:
        output_dir: the run's folder.
        first_iteration: index of the starting policy in the ``M<k>`` naming.
        is_main: whether this process writes (the others only read).
        barrier: called between a phase's look-up and its write, so that no process reads a result the main
            process is replacing (``accelerator.wait_for_everyone``; nothing with one process).
    """

    def __init__(
        self,
        output_dir: str | Path,
        first_iteration: int = FIRST_ITERATION,
        is_main: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        self.layout = RunLayout(output_dir)
        self.output_dir = self.layout.output_dir
        self.first_iteration = first_iteration
        self.is_main = is_main
        self.barrier = barrier or (lambda: None)
        self.checksums = Checksums(self.output_dir, self.state_dir, atomic_write_json)

    # ------------------------------------------------------------ layout
    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    @property
    def manifest_path(self) -> Path:
        return self.layout.manifest_path

    def iteration_dir(self, index: int) -> Path:
        return self.layout.iteration_dir(index)

    def round_dir(self, t: int) -> Path:
        return self.layout.round_dir(t)

    def trainer_checkpoint_dir(self, t: int) -> Path:
        return self.layout.trainer_checkpoint_dir(t)

    def iteration(self, t: int) -> int:
        """``k`` of ``π_t = M<k>`` in this run (`trl_cream.runs.layout.iteration_index`)."""
        return iteration_index(t, self.first_iteration)

    # ------------------------------------------------------------ one phase
    def load_or_compute(
        self, load: Callable[[], T | None], compute: Callable[[], T], save: Callable[[T], None]
    ) -> tuple[T, bool]:
        """A phase's result and whether it was reused: ``load()`` it when an earlier attempt saved it (``True``), else
        ``compute()`` and ``save`` it (``False``).

        Every process looks before the main process may write (``barrier``), so a process never reads a result that
        is being replaced; ``save`` writes on the main process only (the others return the computed value)."""
        loaded = load()
        self.barrier()
        if loaded is not None:
            return loaded, True
        result = compute()
        save(result)
        return result, False

    # ------------------------------------------------------------ the run as a whole
    def last_complete_round(self, num_rounds: int) -> int:
        """The last round ``t`` with ``M<first+t>`` saved such that every earlier one is saved too (0: none)."""
        done = 0
        for t in range(1, num_rounds + 1):
            if not self.has_iteration(self.iteration(t + 1)):
                break
            done = t
        return done

    def has_iteration(self, index: int) -> bool:
        """Whether this run saved ``M<index>`` (an overwritten run's ``M<k>``, kept until replaced, is not)."""
        return self.iteration_dir(index).is_dir() and index not in stale_iterations(self.layout)

    def verify_iteration(self, index: int, what_to_do: str) -> None:
        """Check every file of ``M<index>`` against the digests recorded when it was saved (`DamagedFile` names the
        folder and the file)."""
        self.checksums.verify_folder(self.iteration_dir(index), what_to_do)

    def is_pushed(self, index: int) -> bool:
        """Whether ``M<index>`` is fully on the Hub: its marker ``cream_state/pushed/M<index>.json`` exists."""
        return self.layout.push_marker_path(index).is_file()

    @contextmanager
    def writing_iteration(self, index: int) -> Iterator[Path]:
        """Yield a temporary folder for ``M<index>``; it becomes ``M<index>`` once the block succeeds."""
        with atomic_dir(self.iteration_dir(index), self.is_main) as tmp:
            yield tmp
        if self.is_main:  # the digest of every file, then the folder is this run's (no longer an old run's)
            self.checksums.record_folder(self.iteration_dir(index))
            stale = stale_iterations(self.layout)
            if index in stale:
                atomic_write_json(self.layout.stale_iterations_path, sorted(stale - {index}))

    # ------------------------------------------------------------ SFT
    def save_sft_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_json(self.layout.sft_metrics_path, metrics)
            self.checksums.record(self.layout.sft_metrics_path)

    def load_sft_metrics(self) -> dict[str, Any]:
        path = self.layout.sft_metrics_path
        if not path.exists():
            return {}
        try:
            return load_checked(path, lambda: read_json(path), self.checksums)
        except DamagedFile as error:
            raise DamagedFile(
                f"{error}. It holds the SFT stage's metrics only (M{self.first_iteration} holds its result): delete "
                "it and resume; the model cards then lack the SFT metrics."
            ) from None

    # ------------------------------------------------------------ damaged phase files
    PHASE_FILES = ("samples", "scores.safetensors", "candidates", "pairing.json", "pairs")

    def _load_phase(self, t: int, name: str, paths: list[Path], load: Any) -> Any:
        """``load()`` after checking ``paths``; a damaged file is named, the phase and the round's later phases are
        removed (main process) and `None` is returned, so that the phase is recomputed."""
        try:
            for path in paths:
                self.checksums.verify(path)
            return load_checked(paths[0], load)
        except DamagedFile as error:
            logger.warning(
                "Round %d: %s. The %s phase of round %d and the phases after it are recomputed (sampling and "
                "scoring are seeded, so the result is the one the damaged file held).",
                t, error, name, t,
            )  # fmt: skip
            if self.is_main:
                for later in self.PHASE_FILES[self.PHASE_FILES.index(paths[0].name) :]:
                    _remove(self.round_dir(t) / later)
            return None

    # ------------------------------------------------------------ phases of a round
    def save_samples(self, t: int, prompt_ids: list[list[int]], candidates: list[list[list[int]]]) -> None:
        table = Dataset.from_dict(
            {"prompt_index": list(range(len(prompt_ids))), "prompt_input_ids": prompt_ids, "candidates": candidates}
        )
        save_dataset(table, self.round_dir(t) / "samples", self.is_main)
        if self.is_main:
            self.checksums.record(self.round_dir(t) / "samples")

    def load_samples(self, t: int, prompt_ids: list[list[int]]) -> list[list[list[int]]] | None:
        """The round's saved candidates, or `None`; refuses samples drawn for other prompt tokens."""
        path = self.round_dir(t) / "samples"
        if not path.is_dir():
            return None
        table = self._load_phase(t, "sampling", [path], lambda: load_from_disk(str(path)))
        if table is None:
            return None
        if table["prompt_input_ids"] != prompt_ids:
            raise ValueError(
                f"The candidates saved in {path} were sampled for other prompt tokens than round {t}'s prompts "
                "tokenize to now: was the tokenizer or its chat template changed? Resume with the original one."
            )
        return [[list(c) for c in cands] for cands in table["candidates"]]

    def save_scores(self, t: int, scores: RoundScores) -> None:
        if not self.is_main:
            return
        tensors = {"policy": scores.policy, "initial": scores.initial, "lengths": scores.lengths}
        for name in ("previous", "reward", "baseline"):  # the external reward / baseline sources' scores too
            if getattr(scores, name) is not None:
                tensors[name] = getattr(scores, name)
        metadata = {"reward_metrics": json.dumps(scores.reward_metrics)}
        save_tensors(tensors, self.round_dir(t) / "scores.safetensors", metadata)
        self.checksums.record(self.round_dir(t) / "scores.safetensors")

    def load_scores(self, t: int) -> RoundScores | None:
        path = self.round_dir(t) / "scores.safetensors"
        if not path.exists():
            return None

        def load() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            with safe_open(str(path), framework="pt") as f:
                metrics = json.loads((f.metadata() or {}).get("reward_metrics", "{}"))
            return load_file(str(path)), metrics

        loaded = self._load_phase(t, "scoring", [path], load)
        if loaded is None:
            return None
        tensors, reward_metrics = loaded
        return RoundScores(
            policy=tensors["policy"],
            initial=tensors["initial"],
            previous=tensors.get("previous"),
            lengths=tensors["lengths"],
            reward=tensors.get("reward"),
            baseline=tensors.get("baseline"),
            reward_metrics=reward_metrics,
        )

    def save_pairs(self, t: int, pairs: Dataset, metrics: dict[str, Any], candidates: Dataset | None) -> None:
        """The pairing phase: ``candidates/`` (optional), ``pairing.json``, then ``pairs/`` (its completion mark)."""
        if not self.is_main:
            return
        if candidates is not None:
            save_dataset(candidates, self.round_dir(t) / "candidates")
            self.checksums.record(self.round_dir(t) / "candidates")
        atomic_write_json(self.layout.pairing_path(t), metrics)
        self.checksums.record(self.layout.pairing_path(t))
        save_dataset(pairs, self.round_dir(t) / "pairs")
        self.checksums.record(self.round_dir(t) / "pairs")

    def load_pairs(self, t: int) -> tuple[Dataset, dict[str, Any]] | None:
        path, pairing = self.round_dir(t) / "pairs", self.layout.pairing_path(t)
        if not path.is_dir() or not pairing.exists():
            return None

        def load() -> tuple[Dataset, dict[str, Any]]:
            return load_checked(path, lambda: load_from_disk(str(path))), load_checked(
                pairing, lambda: read_json(pairing)
            )

        return self._load_phase(t, "pairing", [pairing, path], load)

    def last_trainer_checkpoint(self, t: int) -> Path | None:
        """The latest complete intra-round Trainer checkpoint of round ``t`` (one with ``trainer_state.json``)."""
        folder = self.trainer_checkpoint_dir(t)
        if not folder.is_dir():
            return None
        found = [
            (step, p)
            for p in folder.iterdir()
            if (step := parse_trainer_checkpoint(p.name)) is not None and (p / "trainer_state.json").exists()
        ]
        return max(found)[1] if found else None

    def drop_trainer_checkpoints(self, t: int) -> None:
        """Once ``M<t+1>`` is saved the round's intra-round checkpoints are no longer needed."""
        if self.is_main:
            _remove(self.trainer_checkpoint_dir(t))

    def save_round_metrics(self, t: int, metrics: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_json(self.layout.round_metrics_path(t), metrics)
            self.checksums.record(self.layout.round_metrics_path(t))

    def load_round_metrics(self, t: int) -> dict[str, Any]:
        """A finished round's metrics (``metrics.json``, else ``pairing.json``); a damaged file is named with what
        to do (the round's model is saved, so nothing is recomputed)."""
        for path in (self.layout.round_metrics_path(t), self.layout.pairing_path(t)):
            if path.exists():
                try:
                    return load_checked(path, lambda p=path: read_json(p), self.checksums)
                except DamagedFile as error:
                    raise DamagedFile(
                        f"{error}. Round {t} is finished (M{self.first_iteration + t} is saved); this file only holds "
                        f"its metrics for the model cards. Delete it and resume (round {t}'s metrics are then read "
                        "from what is left, or missing), or restore it."
                    ) from None
        return {"round": t}
