"""Publishing CREAM iterations to the Hugging Face Hub, one revision (or repo) per ``M<k>``.

[`HubPublisher`] pushes ``output_dir/M<k>`` in one background worker thread (as TRL's `Trainer` does with
``run_as_future``), so that a push does not block the next round; ``train()`` waits for the pushes at the end. Each
Hub call that fails transiently (network error, timeout, 429, 5xx) is retried with exponential backoff; a permanent
error (401 bad token, 403 no write access, ...) is not. A push that still fails raises (`hub_push_failure="raise"`)
or warns and lets training go on (`"warn"`). The local ``M<k>`` folder is only read, never changed, by a push.

Layouts (`hub_iteration_strategy`):

- ``"branch"``: one repo ``hub_model_id`` with a branch per iteration (``M1``, ``M2``, ...) and ``main`` = the latest;
- ``"repo"``: one repo per iteration, ``{hub_model_id}-M<k>``.

With `push_round_datasets`, each round's ``candidates``/``pairs`` (with ``C`` and every score) go to the dataset repo
``{hub_model_id}-rounds`` as ``round_<t>/{candidates,pairs}.parquet`` plus ``round_<t>/metrics.json``.

Once an iteration is fully on the Hub, the marker ``output_dir/cream_state/pushed/M<k>.json`` is written; a resumed
run pushes the iterations whose marker is missing ([`is_pushed`]). Tokens are never logged, written to a card or put
into a marker, and ``training_args.bin`` (a pickle) is never uploaded.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..runs.files import atomic_write_json
from ..runs.layout import RunLayout, iteration_index
from .utils import (
    FAILURE_MODES,
    MERGED_SUBFOLDER,
    STRATEGIES,
    HubArgs,
    RetryPolicy,
    describe,
    is_retryable,
    iteration_files,
    iteration_target,
    local_cause,
    redact,
    require_token,
    round_files,
    validate_settings,
    with_retries,
)

__all__ = [
    "FAILURE_MODES",
    "MERGED_SUBFOLDER",
    "STRATEGIES",
    "HubPublisher",
    "HubPushError",
    "HubSettings",
    "RetryPolicy",
    "is_pushed",
    "iteration_target",
    "latest_local_iteration",
    "marker_path",
    "validate_settings",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class HubPushError(RuntimeError):
    """A push to the Hub failed after every retry (`hub_push_failure="raise"`)."""


# ---------------------------------------------------------------- markers (shared interface with resume)
def marker_path(output_dir: str | Path, index: int) -> Path:
    """``output_dir/cream_state/pushed/M<index>.json``."""
    return RunLayout(output_dir).push_marker_path(index)


def is_pushed(output_dir: str | Path, index: int) -> bool:
    """Whether ``M<index>`` of the run in ``output_dir`` is fully on the Hub (its push marker exists)."""
    return marker_path(output_dir, index).is_file()


def write_marker(output_dir: str | Path, index: int, info: dict[str, Any]) -> Path:
    """Write the push marker of ``M<index>`` atomically (`trl_cream.runs.files.atomic_write_json`)."""
    path = marker_path(output_dir, index)
    atomic_write_json(path, info)
    return path


# ---------------------------------------------------------------- names
def rounds_repo_id(hub_model_id: str) -> str:
    """The dataset repo of the round artifacts."""
    return f"{hub_model_id}-rounds"


def latest_local_iteration(output_dir: str | Path, last: int | None = None) -> int:
    """The highest ``k`` of the ``output_dir/M<k>`` folders, up to the run's ``last`` iteration when given (a
    user's own ``M9/`` beside a 2-round run is not the run's latest); ``-1`` when there is none."""
    return max((k for k in RunLayout(output_dir).iterations() if last is None or k <= last), default=-1)


# ---------------------------------------------------------------- the publisher
@dataclass
class HubSettings:
    """What [`HubPublisher`] needs from the config; built by [`HubSettings.from_args`]."""

    output_dir: Path
    hub_model_id: str
    token: str | None = field(default=None, repr=False)
    private: bool | None = None
    strategy: str = "branch"
    failure: str = "raise"
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    push_round_datasets: bool = False
    push_merged_weights: bool = False
    base_model_id: str | None = None
    last_iteration: int | None = None

    @classmethod
    def from_args(cls, args: HubArgs) -> HubSettings:
        """The hub fields of a `CreamConfig` ([`HubArgs`])."""
        return cls(
            output_dir=Path(args.output_dir),
            hub_model_id=args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            strategy=args.hub_iteration_strategy,
            failure=args.hub_push_failure,
            policy=RetryPolicy(args.hub_push_retries, args.hub_push_backoff),
            push_round_datasets=args.push_round_datasets,
            push_merged_weights=args.push_merged_weights,
            base_model_id=args.hub_base_model_id,
            last_iteration=iteration_index(args.num_iterations + 1),
        )


class HubPublisher:
    """Pushes iterations in one background thread; see the module docstring."""

    def __init__(self, settings: HubSettings, api: Any | None = None) -> None:
        from huggingface_hub import HfApi

        self.settings = settings
        self.api = api if api is not None else HfApi(token=settings.token)
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._pending: list[tuple[int, Future]] = []
        self._latest = 0
        self.failed: dict[int, str] = {}

    # ------------------------------------------------ start-up check
    def check_access(self) -> dict[str, Any] | None:
        """A cheap ``whoami`` through the client, before any training. Raises [`HubPushError`] or warns (per
        `hub_push_failure`) when the Hub is unreachable or the token is refused."""
        s = self.settings
        try:
            if local_cause() is not None:  # offline: fail at once, with no network call and no retry
                from huggingface_hub.errors import OfflineModeIsEnabled

                raise OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
            require_token(self.settings.token)
            return with_retries(lambda: self.api.whoami(token=s.token), "start-up check (whoami)", s.policy, s.token)
        except Exception as error:
            cause = local_cause(error) or redact(describe(error), s.token)
            message = (
                f"push_to_hub=True but the Hub at {self.api.endpoint} cannot be used: {cause}. Check the network, "
                "HF_HUB_OFFLINE and the token (`hub_token`, HF_TOKEN or `hf auth login`), or set push_to_hub=False "
                "(CLI: drop --push_to_hub); a run already saved pushes what is missing when resumed with "
                "--resume_from_checkpoint."
            )
            self._fail(message, error)
            return None

    # ------------------------------------------------ scheduling
    def submit(self, index: int, folder: Path, round_dir: Path | None = None) -> Future:
        """Schedule the push of ``folder`` (``M<index>``) and, with `push_round_datasets`, of ``round_dir``."""
        self.raise_failures()
        if self._worker is None:  # a daemon thread: a push that hangs never keeps a stopped run's process alive
            self._worker = threading.Thread(target=self._work, name="cream-hub-push", daemon=True)
            self._worker.start()
        # main follows the latest iteration: never move it back to an older one (e.g. a resumed run pushing a
        # missing M1 when M3 is saved already)
        local = latest_local_iteration(self.settings.output_dir, self.settings.last_iteration)
        self._latest = max(self._latest, index, local)
        future: Future = Future()
        update_main = index >= self._latest
        self._queue.put((lambda: self._push_safely(index, folder, round_dir, update_main), future))
        self._pending.append((index, future))
        return future

    def _work(self) -> None:
        """The worker thread: run the scheduled pushes one at a time, in order."""
        while True:
            push, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(push())
            except BaseException as error:  # handed to the main thread by `raise_failures`
                future.set_exception(error)

    def wait(self) -> None:
        """Block until every scheduled push is done, then raise the first failure (`"raise"` mode). A Ctrl-C stops
        the wait (and the run) at once; the pushes not finished are retried when the run is resumed."""
        try:
            for _, future in self._pending:
                future.exception()
        except KeyboardInterrupt:
            waiting = [f"M{i}" for i, f in self._pending if not f.done()]
            logger.warning(
                "Interrupted while pushing %s to the Hub: the run stops now. Its saved iterations are intact, and the "
                "pushes that did not finish are retried when the run is resumed (train(resume_from_checkpoint=True), "
                "CLI: --resume_from_checkpoint).",
                ", ".join(waiting) or "the last iteration",
            )
            raise
        self.raise_failures()

    def raise_failures(self) -> None:
        """Re-raise, in the calling (main) thread, a failure of a finished background push."""
        done = [(i, f) for i, f in self._pending if f.done()]
        self._pending = [(i, f) for i, f in self._pending if not f.done()]
        for _, future in done:
            error = future.exception()
            if error is not None:
                raise error

    # ------------------------------------------------ the push (worker thread)
    def _push_safely(self, index: int, folder: Path, round_dir: Path | None, update_main: bool) -> dict | None:
        s = self.settings
        try:
            info = self.push(index, folder, round_dir, update_main)
        except Exception as error:
            repo_id, revision = iteration_target(s.hub_model_id, s.strategy, index)
            cause = local_cause(error) or redact(describe(error), s.token)
            message = (
                f"Pushing M{index} to {repo_id}@{revision} failed: {cause} "
                f"({f'still failing after {s.policy.retries} retries' if is_retryable(error) else 'not retried'}). "
                f"The local checkpoint {folder} is intact; a resumed run (train(resume_from_checkpoint=True), CLI: "
                "trl-cream train ... --resume_from_checkpoint) pushes the iterations that are missing."
            )
            self.failed[index] = message
            self._fail(message, error)
            return None
        logger.info("Hub: M%d is at %s (revision %s).", index, info["repo_id"], info["revision"])
        return info

    def push(self, index: int, folder: Path, round_dir: Path | None = None, update_main: bool = True) -> dict:
        """Push ``M<index>`` (synchronously, with retries) and write its marker. Returns the marker's content."""
        s = self.settings
        repo_id, revision = iteration_target(s.hub_model_id, s.strategy, index)
        message = f"CREAM iteration M{index}"
        self._retry(f"create_repo {repo_id}", lambda: self.api.create_repo(repo_id, private=s.private, exist_ok=True))
        if s.strategy == "branch":
            self._retry(
                f"create_branch {revision}", lambda: self.api.create_branch(repo_id, branch=revision, exist_ok=True)
            )
        with tempfile.TemporaryDirectory(prefix=f"trl-cream-M{index}-") as staging:
            files = iteration_files(folder, Path(staging), s.base_model_id, s.push_merged_weights)
            commit = self._commit(repo_id, revision, files, message)
            if s.strategy == "branch" and update_main:
                self._commit(repo_id, "main", files, message)
        info = {"iteration": index, "repo_id": repo_id, "revision": revision, "commit": commit, "time": time.time()}
        if s.push_round_datasets and round_dir is not None:
            info["rounds_repo_id"] = self.push_round(round_dir)
        write_marker(s.output_dir, index, info)
        return info

    def push_round(self, round_dir: Path) -> str:
        """Upload a round's ``candidates``/``pairs`` as parquet and its ``metrics.json`` to the rounds dataset repo."""
        s = self.settings
        repo_id = rounds_repo_id(s.hub_model_id)
        self._retry(
            f"create_repo {repo_id}",
            lambda: self.api.create_repo(repo_id, repo_type="dataset", private=s.private, exist_ok=True),
        )
        with tempfile.TemporaryDirectory(prefix=f"trl-cream-{round_dir.name}-") as staging:
            files = round_files(round_dir, Path(staging))
            message = f"CREAM {round_dir.name} artifacts"
            self._commit(repo_id, "main", files, message, repo_type="dataset", prune=False)
        return repo_id

    def _commit(
        self,
        repo_id: str,
        revision: str,
        files: dict[str, Path],
        message: str,
        repo_type: str | None = None,
        prune: bool = True,
    ) -> str:
        """One commit with every file, each uploaded from its local path (``path_in_repo → file``); with ``prune``,
        files of the revision that ``files`` lacks are deleted so that the revision mirrors the folder."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        def run() -> str:
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in files.items()
            ]
            if prune:
                remote = self.api.list_repo_files(repo_id, revision=revision, repo_type=repo_type)
                stale = sorted(set(remote) - set(files) - {".gitattributes"})
                operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
            info = self.api.create_commit(
                repo_id, operations, commit_message=message, revision=revision, repo_type=repo_type
            )
            return info.oid

        return self._retry(f"commit to {repo_id}@{revision}", run)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        require_token(self.settings.token)
        return with_retries(fn, what, self.settings.policy, self.settings.token)

    def _fail(self, message: str, error: BaseException) -> None:
        if self.settings.failure == "raise":
            raise HubPushError(message) from None
        logger.warning("%s Training goes on (hub_push_failure='warn').", message)
        warnings.warn(message, stacklevel=2)
