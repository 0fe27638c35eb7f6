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

``cream_state/manifest.json`` (`trl_cream.manifest`) records the configuration (secrets removed), dataset
fingerprints and seeds; a resume with a different manifest, or a fresh start in a folder holding another run, is
refused. Nothing here writes or reads a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from datasets import Dataset, load_from_disk
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.labelling import RoundScores
from .layout import (
    FIRST_ITERATION,
    PARTIAL_SUFFIX,
    RunLayout,
    is_iteration_leftover,
    iteration_index,
    parse_trainer_checkpoint,
)
from .manifest import manifest_differences

logger = logging.getLogger(__name__)


T = TypeVar("T")


# ---------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_dir(path: Path, enabled: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    The temporary name is deterministic (``.<name>.partial``), so every process of a distributed run writes into
    the same folder; only the process with ``enabled=True`` (the main one) clears, renames or removes it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    if enabled:
        _remove(tmp)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if enabled:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if enabled:
        if path.exists():  # a stale result of an earlier attempt: move it aside first, then drop it
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)


def save_dataset(dataset: Dataset, path: Path, enabled: bool = True) -> None:
    """``dataset.save_to_disk(path)``, atomically."""
    with atomic_dir(path, enabled) as tmp:
        if enabled:
            dataset.save_to_disk(str(tmp))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (with string ``metadata``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- model weights
def _weight_files(path: Path, adapter: bool) -> list[Path]:
    stem = "adapter_model" if adapter else "model"
    index = path / f"{stem}.safetensors.index.json"
    if index.exists():
        return sorted({path / name for name in read_json(index)["weight_map"].values()})
    single = path / f"{stem}.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{path} holds no {single.name}: only safetensors checkpoints are resumed from. Was the run saved with "
            "save_safetensors=False? Start a new run."
        )
    return [single]


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the safetensors weights saved in ``path`` into ``model`` in place (tied weights included)."""
    params = model.state_dict()
    loaded: set[str] = set()
    for file in _weight_files(Path(path), adapter=False):
        for name, tensor in load_file(str(file)).items():
            if name not in params:
                raise ValueError(f"{file} holds {name!r}, which the model does not have: is it the same architecture?")
            params[name].copy_(tensor.to(params[name].dtype))
            loaded.add(name)
    pointers = {params[n].data_ptr() for n in loaded}
    missing = [n for n in params if n not in loaded and params[n].data_ptr() not in pointers]
    if missing:
        raise ValueError(f"{path} lacks weights for {missing[:5]}: it is not a checkpoint of this model.")


@torch.no_grad()
def load_adapter_weights(model: Any, adapter_name: str, path: Path) -> None:
    """Load a LoRA adapter saved in ``path`` into the existing adapter ``adapter_name`` of a PeftModel."""
    from peft import set_peft_model_state_dict

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path), adapter=True):
        state.update(load_file(str(file)))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"The adapter in {path} does not fit adapter {adapter_name!r}: unexpected {unexpected[:5]}.")


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
    def load_or_compute(self, load: Callable[[], T | None], compute: Callable[[], T], save: Callable[[T], None]) -> T:
        """A phase's result: ``load()`` it when an earlier attempt saved it, else ``compute()`` and ``save`` it.

        Every process looks before the main process may write (``barrier``), so a process never reads a result that
        is being replaced; ``save`` writes on the main process only (the others return the computed value)."""
        loaded = load()
        self.barrier()
        if loaded is not None:
            return loaded
        result = compute()
        save(result)
        return result

    # ------------------------------------------------------------ the run as a whole
    def holds_a_run(self) -> bool:
        return self.manifest_path.exists() or self.layout.rounds_dir.exists()

    def start(self, manifest: dict[str, Any], resume: bool, overwrite: bool) -> None:
        """Check ``manifest`` against the folder's run, then record it (one process)."""
        clear = self.check(manifest, resume, overwrite)
        if not resume:
            self.record(manifest, clear)

    def check(self, manifest: dict[str, Any], resume: bool, overwrite: bool) -> bool:
        """Check ``manifest`` against the folder's run, writing nothing (every process, before `record`).

        Returns:
            Whether a previous run must be cleared before this one starts.

        Raises:
            ValueError: resuming with a different manifest or from a folder without a run; starting afresh in a
                folder that holds a different run (unless ``overwrite``).
        """
        old = read_json(self.manifest_path) if self.manifest_path.exists() else None
        if resume:
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
                    + ". Resume with the original settings and data, or start a new run in another output_dir."
                )
            logger.info("Resuming the CREAM run in %s", self.output_dir)
            return False
        if self.holds_a_run():
            diffs = manifest_differences(old, manifest) if old is not None else ["no manifest (an older run)"]
            if diffs and not overwrite:
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
                    "an identical run" if not diffs else "another run (overwrite_output_dir=True)",
                )
            return True
        return False

    def record(self, manifest: dict[str, Any], clear: bool) -> None:
        """A fresh start: clear a previous run if `check` said so, and write the manifest (main process only)."""
        if not self.is_main:
            return
        if clear:
            self.clear()
        atomic_write_json(self.manifest_path, manifest)

    def clear(self) -> None:
        """Remove what a previous run wrote: its state, rounds and ``M<k>`` folders (nothing else)."""
        for child in (self.state_dir, self.layout.rounds_dir):
            _remove(child)
        if self.output_dir.is_dir():
            for child in self.output_dir.iterdir():
                if is_iteration_leftover(child.name) and child.is_dir():
                    _remove(child)

    def last_complete_round(self, num_rounds: int) -> int:
        """The last round ``t`` with ``M<first+t>`` saved such that every earlier one is saved too (0: none)."""
        done = 0
        for t in range(1, num_rounds + 1):
            if not self.iteration_dir(self.iteration(t + 1)).is_dir():
                break
            done = t
        return done

    def has_iteration(self, index: int) -> bool:
        return self.iteration_dir(index).is_dir()

    def is_pushed(self, index: int) -> bool:
        """Whether ``M<index>`` is fully on the Hub: its marker ``cream_state/pushed/M<index>.json`` exists."""
        return self.layout.push_marker_path(index).is_file()

    @contextmanager
    def writing_iteration(self, index: int) -> Iterator[Path]:
        """Yield a temporary folder for ``M<index>``; it becomes ``M<index>`` once the block succeeds."""
        with atomic_dir(self.iteration_dir(index), self.is_main) as tmp:
            yield tmp

    # ------------------------------------------------------------ SFT
    def save_sft_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_json(self.layout.sft_metrics_path, metrics)

    def load_sft_metrics(self) -> dict[str, Any]:
        path = self.layout.sft_metrics_path
        return read_json(path) if path.exists() else {}

    # ------------------------------------------------------------ phases of a round
    def save_samples(self, t: int, prompt_ids: list[list[int]], candidates: list[list[list[int]]]) -> None:
        table = Dataset.from_dict(
            {"prompt_index": list(range(len(prompt_ids))), "prompt_input_ids": prompt_ids, "candidates": candidates}
        )
        save_dataset(table, self.round_dir(t) / "samples", self.is_main)

    def load_samples(self, t: int, prompt_ids: list[list[int]]) -> list[list[list[int]]] | None:
        """The round's saved candidates, or `None`; refuses samples drawn for other prompt tokens."""
        path = self.round_dir(t) / "samples"
        if not path.is_dir():
            return None
        table = load_from_disk(str(path))
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

    def load_scores(self, t: int) -> RoundScores | None:
        path = self.round_dir(t) / "scores.safetensors"
        if not path.exists():
            return None
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            reward_metrics = json.loads((f.metadata() or {}).get("reward_metrics", "{}"))
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
        atomic_write_json(self.layout.pairing_path(t), metrics)
        save_dataset(pairs, self.round_dir(t) / "pairs")

    def load_pairs(self, t: int) -> tuple[Dataset, dict[str, Any]] | None:
        path = self.round_dir(t) / "pairs"
        if not path.is_dir() or not self.layout.pairing_path(t).exists():
            return None
        return load_from_disk(str(path)), read_json(self.layout.pairing_path(t))

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

    def load_round_metrics(self, t: int) -> dict[str, Any]:
        path = self.layout.round_metrics_path(t)
        if path.exists():
            return read_json(path)
        pairing = self.layout.pairing_path(t)
        return read_json(pairing) if pairing.exists() else {"round": t}
