"""What a run owns in ``output_dir`` and whether its saved files are intact.

- `owned_paths`: the ``M<k>`` folders, ``rounds/round_<t>`` folders and ``cream_state`` that a run's manifest lists
  (first iteration, number of rounds), the only things a restart or ``overwrite_output_dir`` removes.
- Checksums: every phase file is recorded in ``cream_state/checksums.json`` (SHA-256 of a file, or of a folder's
  files) when it is saved, and verified when it is loaded; a file that fails either is `DamagedFile`, named with
  what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .layout import PARTIAL_SUFFIX, RunLayout, parse_iteration_name

logger = logging.getLogger(__name__)

CHECKSUMS_NAME = "checksums.json"
CARD_NAME = "README.md"  # an iteration's model card: written after the weights, and again on resume
T = TypeVar("T")


class DamagedFile(ValueError):
    """A file of a saved run that is truncated, corrupt or differs from its recorded checksum."""


def iteration_range(manifest: dict[str, Any] | None) -> tuple[int, int]:
    """(first iteration, number of rounds) recorded in a manifest; (1, 0) when unknown."""
    if not isinstance(manifest, dict):
        return 1, 0
    first = (manifest.get("policy") or {}).get("first_iteration", 1)
    rounds = (manifest.get("config") or {}).get("num_iterations", len((manifest.get("seeds") or {}).get("rounds", {})))
    return int(first), int(rounds)


def owned_paths(layout: RunLayout, manifests: list[dict[str, Any] | None]) -> list[Path]:
    """The ``M<k>`` and ``rounds/round_<t>`` folders (and their ``.partial``/``.old`` leftovers) of the runs the
    manifests describe: nothing else in ``output_dir``."""
    paths: set[Path] = set()
    for manifest in manifests:
        first, rounds = iteration_range(manifest)
        paths |= {layout.iteration_dir(k) for k in range(first, first + rounds + 1)}
        paths |= {layout.round_dir(t) for t in range(1, rounds + 1)}
    found = []
    for path in sorted(paths):
        found += [path, path.with_name(f".{path.name}{PARTIAL_SUFFIX}"), path.with_name(f".{path.name}.old")]
    return found


def stale_iterations(layout: RunLayout) -> set[int]:
    """The ``k`` of the ``M<k>`` folders an overwritten run left in place (not this run's until it saves them)."""
    try:
        return {int(k) for k in json.loads(layout.stale_iterations_path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, TypeError):
        return set()


def recorded_paths(layout: RunLayout, sums: Checksums) -> list[Path]:
    """The ``M<k>`` and ``rounds/round_<t>`` folders that ``checksums.json`` lists files of: what a run wrote, even
    when its manifest is lost (a truncated manifest of a longer run)."""
    found: set[Path] = set()
    for key in sums.entries():
        parts = key.split("/")
        if parse_iteration_name(parts[0]) is not None:
            found.add(layout.output_dir / parts[0])
        elif len(parts) > 1 and parts[0] == layout.rounds_dir.name and parts[1].startswith("round_"):
            found.add(layout.rounds_dir / parts[1])
    return sorted(found)


# ---------------------------------------------------------------- checksums
def checksum(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Checksums:
    """``cream_state/checksums.json``: ``relative path → SHA-256`` of every saved phase file."""

    def __init__(self, output_dir: Path, state_dir: Path, write: Callable[[Path, Any], None]) -> None:
        self.output_dir, self.path, self._write = output_dir, state_dir / CHECKSUMS_NAME, write

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        except (OSError, ValueError):
            logger.warning("%s is unreadable; saved phase files are loaded without verification.", self.path)
            return {}

    def entries(self) -> dict[str, str]:
        return self._load()

    def record(self, path: Path) -> None:
        sums = self._load()
        sums[path.relative_to(self.output_dir).as_posix()] = checksum(path)
        self._write(self.path, sums)

    def record_folder(self, folder: Path) -> None:
        """Record every file of ``folder`` on its own (an ``M<k>``): each file is read once, in 1 MiB blocks, so a
        large model is never held in memory for it. Earlier entries under the folder are replaced. The model card
        (``README.md``, rewritten whenever the iteration is published) is left out."""
        prefix = folder.relative_to(self.output_dir).as_posix() + "/"
        sums = {k: v for k, v in self._load().items() if not k.startswith(prefix)}
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CARD_NAME):
            sums[file.relative_to(self.output_dir).as_posix()] = checksum(file)
        self._write(self.path, sums)

    def verify_folder(self, folder: Path, what_to_do: str) -> None:
        """Raise `DamagedFile` naming the folder and the first file that is missing or differs from the digest
        recorded when ``folder`` was saved; a folder nothing was recorded for passes."""
        prefix = folder.relative_to(self.output_dir).as_posix() + "/"
        for key, expected in sorted(self._load().items()):
            if not key.startswith(prefix):
                continue
            file = self.output_dir / key
            if not file.is_file():
                problem = "is missing"
            elif checksum(file) != expected:
                problem = (
                    "differs from the digest recorded when the folder was saved (a partial copy, a bad disk, "
                    "another run's file?)"
                )
            else:
                continue
            raise DamagedFile(f"{folder}: {file.relative_to(folder).as_posix()} {problem}. {what_to_do}")

    def verify(self, path: Path) -> None:
        """Raise `DamagedFile` when ``path`` differs from its recorded checksum (unrecorded files pass)."""
        expected = self._load().get(path.relative_to(self.output_dir).as_posix())
        if expected is not None and checksum(path) != expected:
            raise DamagedFile(f"{path} differs from the checksum recorded when it was saved")


def load_checked(path: Path, load: Callable[[], T], sums: Checksums | None = None) -> T:
    """``load()`` after verifying ``path``'s checksum; any failure becomes `DamagedFile` naming the file."""
    try:
        if sums is not None:
            sums.verify(path)
        return load()
    except DamagedFile:
        raise
    except Exception as error:  # safetensors, JSON, arrow: each library has its own error types
        raise DamagedFile(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})") from error
