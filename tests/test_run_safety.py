"""Nothing lost, nothing silent (issue 17): what a run may delete, run identity, one run per `train()`, divergence,
damaged files of a saved run, and Hub causes that are not retried.

Each case asserts the message (what, which value, what to do) and that the files that existed before are
byte-identical afterwards (`tree` hashes a folder)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import Dataset
from safetensors.torch import load_file, save_file

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.runs.gate import RunInProgress
from trl_cream.runs.integrity import DamagedFile
from trl_cream.runs.manifest import build_manifest, manifest_differences, not_compared_fields
from trl_cream.runs.store import PhaseStore
from trl_cream.runs.weights import load_full_weights
from trl_cream.trainer.resume import unpushed_iterations


def tree(folder: Path, skip: str | None = None) -> dict[str, str]:
    """``relative path → SHA-256`` of every file under ``folder`` (except those under ``skip``)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (skip and p.relative_to(folder).as_posix().startswith(skip))
    }


def make(out: Path, m0, tokenizer, prompts, model=None, ref=None, cls=CreamTrainer, **overrides) -> CreamTrainer:
    args = cream_args(out, **{"num_iterations": 1, **overrides})
    return cls(
        model=model if model is not None else perturbed(m0),
        ref_model=ref if ref is not None else m0,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )


def user_files(out: Path) -> None:
    """The user's own files in output_dir: an M0/ and an M9/ that no run wrote, and a note."""
    for name in ("M0", "M9"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(f"the user's {name}".encode())
    (out / "notes.txt").write_text("keep me")


# ---------------------------------------------------------------- items 1-3: ownership, identity, one run per train()
def test_a_run_deletes_only_what_it_wrote_and_refuses_other_models_and_a_second_train(
    tmp_path, m0, tokenizer, prompts
):
    out = tmp_path / "run"
    user_files(out)
    mine = tree(out)
    trainer = make(out, m0, tokenizer, prompts)
    trainer.train()
    finished = tree(out)

    # a second train() on the same trainer is refused and touches nothing
    with pytest.raises(RuntimeError, match=r"train\(\) was already called on this CreamTrainer.*Build a new"):
        trainer.train()
    assert tree(out) == finished and len(trainer.round_metrics) == 1

    # another policy, or another π_0, in a folder holding a run: refused on a fresh start and on resume
    other = perturbed(m0, seed=7)
    with pytest.raises(
        ValueError, match=r"already holds a different CREAM run \(models\.policy: the policy .*weights"
    ):
        make(out, m0, tokenizer, prompts, model=other).train()
    other_ref = perturbed(m0, scale=0.01, seed=8)
    with pytest.raises(
        ValueError, match=r"Cannot resume.*models\.initial: π_0 \(`ref_model`\) differs: weights_sha256 '[0-9a-f]+' ->"
    ):
        make(out, m0, tokenizer, prompts, ref=other_ref).train(resume_from_checkpoint=True)
    assert tree(out) == finished

    # another run with overwrite_output_dir replaces the run, and only the run: the user's files stay
    make(out, m0, tokenizer, prompts, seed=1, overwrite_output_dir=True).train()
    assert {k: v for k, v in tree(out).items() if k in mine} == mine
    assert json.loads((out / "cream_state/manifest.json").read_text())["seeds"]["seed"] == 1


def test_iterations_no_run_recorded_are_not_replaced(tmp_path, m0, tokenizer, prompts):
    out = tmp_path / "run"
    (out / "M1").mkdir(parents=True)
    (out / "M1" / "model.safetensors").write_bytes(b"someone else's M1")
    before = tree(out)
    with pytest.raises(ValueError, match=r"holds M1 but no CREAM run recorded them.*Move them away.*overwrite"):
        make(out, m0, tokenizer, prompts).train()
    assert tree(out) == before


def test_changing_a_setting_that_changes_no_result_does_not_block_a_resume(tmp_path):
    prompts = Dataset.from_dict({"prompt": QUESTIONS})
    free = not_compared_fields(CreamConfig)
    assert {"hub_push_retries", "hub_push_backoff", "hub_base_model_id", "hub_card_results", "freeze_gc"} <= free
    assert "hub_push_merged" not in free and "learning_rate" not in free and "seed" not in free
    a = build_manifest(cream_args(tmp_path), prompts, None, False, 1)
    b = build_manifest(
        cream_args(tmp_path, hub_push_retries=9, hub_push_backoff=0.5, freeze_gc=False, logging_steps=5),
        prompts, None, False, 1,
    )  # fmt: skip
    assert manifest_differences(a, b) == []
    c = build_manifest(cream_args(tmp_path, learning_rate=1e-3), prompts, None, False, 1)
    assert manifest_differences(a, c) == ["config.learning_rate: 0.005 -> 0.001"]


def test_the_not_compared_list_cannot_name_a_missing_field():
    class Drifted(CreamConfig):
        resume_free_fields = frozenset({"hub_push_merged"})

    with pytest.raises(ValueError, match=r"\['hub_push_merged'\] are not fields of Drifted"):
        not_compared_fields(Drifted)


# ---------------------------------------------------------------- item 4: divergence
class _Diverging(CreamTrainer):
    """Round 1's training leaves a NaN in one weight (what lr=1e6 does after enough steps), when ``diverge``."""

    diverge = True

    def train_phase(self, *args, **kwargs):
        output = super().train_phase(*args, **kwargs)
        if self.diverge:
            with torch.no_grad():
                next(self.accelerator.unwrap_model(self.model).parameters())[0, 0] = float("nan")
        return output


def test_divergence_stops_the_run_before_the_iteration_is_saved_then_damaged_phases_are_recomputed(
    tmp_path, m0, tokenizer, prompts, caplog
):
    out = tmp_path / "run"
    with pytest.raises(
        FloatingPointError,
        match=r"Round 1 diverged: 1 weight tensor\(s\) of the policy are NaN or inf \(first: model\.embed_tokens"
        r".*learning_rate=0\.005.*M2 is not saved.*Lower learning_rate.*max_grad_norm",
    ):
        make(out, m0, tokenizer, prompts, cls=_Diverging).train()
    round_1 = out / "rounds" / "round_1"
    assert (out / "M1").is_dir() and not (out / "M2").exists() and not (round_1 / "metrics.json").exists()
    assert (round_1 / "scores.safetensors").exists() and (round_1 / "pairs").is_dir()

    # damage two phase files; the resume names each, recomputes them and finishes
    scores = (round_1 / "scores.safetensors").read_bytes()
    (round_1 / "scores.safetensors").write_bytes(scores[: len(scores) // 2])
    samples = tree(round_1 / "samples")
    trainer = make(out, m0, tokenizer, prompts, cls=_Diverging)
    trainer.diverge = False
    with caplog.at_level(logging.WARNING, logger="trl_cream.runs.store"):
        trainer.train(resume_from_checkpoint=True)
    assert f"{round_1 / 'scores.safetensors'} differs from the checksum" in caplog.text
    assert "The scoring phase of round 1 and the phases after it are recomputed" in caplog.text
    assert (round_1 / "scores.safetensors").read_bytes() != scores[: len(scores) // 2]
    assert tree(round_1 / "samples") == samples and (out / "M2").is_dir()  # intact phases were kept


def test_a_real_divergence_with_a_huge_learning_rate_is_refused(tmp_path, m0, tokenizer, prompts):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"Round 1 diverged: .*learning_rate=1e\+30"):
        make(out, m0, tokenizer, prompts, learning_rate=1e30, max_grad_norm=0.0).train()
    assert not (out / "M2").exists()


# ---------------------------------------------------------------- item 5: a failed start never blocks the rerun
class _FailsToSample(CreamTrainer):
    def generate_candidates(self, prompt_ids, desc="sampling"):
        raise RuntimeError("sampling failed")


def test_a_run_that_finished_no_phase_is_replaced_by_the_corrected_rerun(tmp_path, m0, tokenizer, prompts):
    out = tmp_path / "run"
    user_files(out)
    mine = tree(out)
    with pytest.raises(RuntimeError, match="sampling failed"):
        make(out, m0, tokenizer, prompts, cls=_FailsToSample).train()
    assert (out / "cream_state/manifest.json").exists() and (out / "M1").is_dir()
    make(out, m0, tokenizer, prompts, learning_rate=1e-3).train()  # another config, no overwrite_output_dir
    assert (out / "M2").is_dir()
    assert {k: v for k, v in tree(out).items() if k in mine} == mine


# ---------------------------------------------------------------- item 6: damaged files of a finished run
DAMAGED = r"(cannot be read|differs from the checksum recorded when it was saved)"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damaged", "message"),
    [
        (
            "rounds/round_1/metrics.json",
            rf"metrics\.json {DAMAGED}.*Round 1 is finished \(M2 is saved\).*Delete it and resume",
        ),
        ("M2/model.safetensors", r"M2: model\.safetensors differs from the digest.*delete \S+/M2 and resume"),
        ("cream_state/manifest.json", r"Cannot resume .*manifest\.json cannot be read.*overwrite_output_dir=True"),
    ],
)
def test_a_damaged_file_of_a_finished_run_is_named_with_what_to_do(
    finished_run, m0, tokenizer, prompts, damaged, message
):
    _truncate(finished_run / damaged)
    before = tree(finished_run)
    with pytest.raises(ValueError, match=message):
        make(finished_run, m0, tokenizer, prompts).train(resume_from_checkpoint=True)
    assert tree(finished_run) == before


def test_a_run_whose_manifest_is_unreadable_is_cleared_by_overwrite_output_dir(finished_run, m0, tokenizer, prompts):
    user_files(finished_run)
    mine = tree(finished_run, skip="M1")
    mine = {k: v for k, v in mine.items() if k.split("/")[0] in {"M0", "M9", "notes.txt"}}
    _truncate(finished_run / "cream_state/manifest.json")
    with pytest.raises(ValueError, match=r"already holds a different CREAM run \(.*manifest\.json cannot be read"):
        make(finished_run, m0, tokenizer, prompts).train()
    make(finished_run, m0, tokenizer, prompts, overwrite_output_dir=True).train()
    assert json.loads((finished_run / "cream_state/manifest.json").read_text())["format"] == 1
    assert {k: v for k, v in tree(finished_run).items() if k in mine} == mine


def test_damaged_pairing_is_recomputed_from_the_saved_scores(tmp_path, m0, tokenizer, prompts, caplog):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError):
        make(out, m0, tokenizer, prompts, cls=_Diverging).train()
    pairing = out / "rounds/round_1/pairing.json"
    good = json.loads(pairing.read_text())
    _truncate(pairing)
    trainer = make(out, m0, tokenizer, prompts, cls=_Diverging)
    trainer.diverge = False
    with caplog.at_level(logging.WARNING, logger="trl_cream.runs.store"):
        trainer.train(resume_from_checkpoint=True)
    assert f"{pairing} differs from the checksum" in caplog.text and "The pairing phase of round 1" in caplog.text
    assert json.loads(pairing.read_text()) == good  # recomputed from the intact scores: the same pairs and C


def test_damaged_file_names_the_file():
    from trl_cream.runs.integrity import load_checked

    with pytest.raises(DamagedFile, match=r"/x/scores\.safetensors cannot be read \(ValueError: bad"):
        load_checked(Path("/x/scores.safetensors"), lambda: (_ for _ in ()).throw(ValueError("bad")))


# ---------------------------------------------------------------- item 7: the Hub
class _NoTokenApi:
    endpoint = "https://huggingface.co"

    def __init__(self) -> None:
        self.calls = 0

    def whoami(self, token=None):
        from huggingface_hub.errors import LocalTokenNotFoundError

        self.calls += 1
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")


def test_a_missing_token_is_not_retried_and_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from trl_cream.hub import HubPublisher, HubPushError, HubSettings, RetryPolicy

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    sleeps: list[float] = []
    api = _NoTokenApi()
    settings = HubSettings(output_dir=tmp_path, hub_model_id="me/cream", policy=RetryPolicy(3, 2.0, sleeps.append))
    with pytest.raises(
        HubPushError, match=r"cannot be used: no token: run hf auth login or set HF_TOKEN.*--resume_from_checkpoint"
    ):
        HubPublisher(settings, api=api).check_access()
    assert api.calls == 0 and sleeps == []  # no token anywhere: no call at all, no 14-21 s of back-off


class _Unreachable(_NoTokenApi):
    def whoami(self, token=None):
        self.calls += 1
        raise ConnectionError("ConnectError: [Errno 101] Network is unreachable")

    create_repo = whoami


def test_warn_mode_without_any_token_names_the_token_and_retries_nothing(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from trl_cream.hub import HubPublisher, HubSettings, RetryPolicy

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    sleeps: list[float] = []
    api = _Unreachable()
    settings = HubSettings(
        output_dir=tmp_path, hub_model_id="me/cream", failure="warn", policy=RetryPolicy(3, 2.0, sleeps.append)
    )
    publisher = HubPublisher(settings, api=api)
    with pytest.warns(UserWarning, match=r"cannot be used: no token: run hf auth login"):
        publisher.check_access()
    (tmp_path / "M1").mkdir()
    (tmp_path / "M1" / "config.json").write_text("{}")
    (tmp_path / "M1" / "README.md").write_text("a card")
    with pytest.warns(UserWarning, match=r"Pushing M1 to .* failed: no token: run hf auth login.*\(not retried\)"):
        publisher.submit(1, tmp_path / "M1").result()
    assert api.calls == 0 and sleeps == [] and "ConnectError" not in str(publisher.failed)


def test_offline_mode_is_named_without_any_call(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from trl_cream.hub import HubPublisher, HubPushError, HubSettings

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    api = _NoTokenApi()
    with pytest.raises(HubPushError, match=r"cannot be used: HF_HUB_OFFLINE=1 is set.*--resume_from_checkpoint"):
        HubPublisher(HubSettings(output_dir=tmp_path, hub_model_id="me/cream"), api=api).check_access()
    assert api.calls == 0


def test_identity_of_two_loads_of_the_same_model_is_the_same(m0, tokenizer):
    from trl_cream.runs.manifest import run_identity

    a = run_identity(perturbed(m0), m0, tokenizer, peft=False)
    b = run_identity(perturbed(m0), copy.deepcopy(m0), tokenizer, peft=False)
    assert a == b and a["policy"]["weights_sha256"] != a["initial"]["weights_sha256"]
    assert a["tokenizer"]["size"] == len(tokenizer) and a["policy"]["vocab_size"] == m0.config.vocab_size


def test_a_users_own_later_iteration_folder_is_not_taken_as_the_runs_latest(tmp_path):
    from trl_cream.hub import latest_local_iteration
    from trl_cream.hub.publisher import HubSettings

    for name in ("M1", "M2", "M9"):
        (tmp_path / name).mkdir()
    settings = HubSettings.from_args(cream_args(tmp_path, push_to_hub=True, hub_model_id="me/cream"))
    assert settings.last_iteration == 3  # a 2-round run writes M1..M3
    assert latest_local_iteration(tmp_path, settings.last_iteration) == 2  # so `main` still follows M2, M3
    assert latest_local_iteration(tmp_path) == 9


# ---------------------------------------------------------------- issue 23: one run per folder, finished runs, digests
_HOLD_LOCK = """
import sys, time
from trl_cream.runs.gate import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_process_on_the_same_folder_is_refused_at_once_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path, m0, tokenizer, prompts
):

    out = tmp_path / "run"
    user_files(out)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(out)
        with pytest.raises(
            RunInProgress,
            match=rf"output_dir='{out}': a CREAM run is in progress there \(process {holder.pid} on host "
            rf"{socket.gethostname()} holds .*run\.lock\)\. One run folder holds one run at a time",
        ):
            make(out, m0, tokenizer, prompts).train()
        assert tree(out) == before  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    make(out, m0, tokenizer, prompts).train()  # nothing stale blocks the next run
    assert (out / "M2").is_dir() and not (out / "cream_state/run.owner.json").exists()


def test_a_finished_run_is_not_redone_by_accident_and_overwrite_keeps_old_iterations_until_replaced(
    finished_run, m0, tokenizer, prompts
):
    before = tree(finished_run)
    with pytest.raises(
        ValueError,
        match=r"holds a finished CREAM run with these settings \(M1 to M2 are saved\).*resume_from_checkpoint=True"
        r".*overwrite_output_dir=True to train it again",
    ):
        make(finished_run, m0, tokenizer, prompts).train()
    assert tree(finished_run) == before

    # overwrite_output_dir, stopped in round 1: the old M2 is still there (not a window with no M2) ...
    old_m2 = (finished_run / "M2/model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="sampling failed"):
        make(finished_run, m0, tokenizer, prompts, seed=1, overwrite_output_dir=True, cls=_FailsToSample).train()
    assert (finished_run / "M2/model.safetensors").read_bytes() == old_m2
    # ... and a resume does not take it for this run's M2: round 1 is trained and replaces it
    trainer = make(finished_run, m0, tokenizer, prompts, seed=1, overwrite_output_dir=True)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.round_metrics[0]["train_steps"] > 0
    assert (finished_run / "M2/model.safetensors").read_bytes() != old_m2
    assert json.loads((finished_run / "cream_state/stale_iterations.json").read_text()) == []


def test_an_iteration_whose_weights_were_replaced_is_named_before_it_is_loaded_or_pushed(
    finished_run, m0, tokenizer, prompts
):
    shutil.copy(finished_run / "M2/model.safetensors", finished_run / "M1")  # valid weights: only the digest tells
    before = tree(finished_run)
    with pytest.raises(
        DamagedFile, match=r"/M1: model\.safetensors differs from the digest recorded.*delete \S+/M1 and resume"
    ):
        make(finished_run, m0, tokenizer, prompts).train(resume_from_checkpoint=True)
    assert tree(finished_run) == before
    with pytest.raises(DamagedFile, match=r"/M1: model\.safetensors differs"):  # nothing damaged is pushed
        unpushed_iterations(PhaseStore(finished_run), 1)
    (finished_run / "M2/README.md").write_text("a card rewritten when M2 is published again")
    PhaseStore(finished_run).verify_iteration(2, "")  # the card is not part of the digests
    (finished_run / "M2/config.json").unlink()
    with pytest.raises(DamagedFile, match=r"/M2: config\.json is missing"):
        PhaseStore(finished_run).verify_iteration(2, "")


def test_the_users_readme_in_output_dir_is_not_replaced_by_intra_round_checkpoints(tmp_path, m0, tokenizer, prompts):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("# my experiment notes\n")
    make(out, m0, tokenizer, prompts, save_strategy="steps", save_steps=1).train()
    assert (out / "README.md").read_text() == "# my experiment notes\n"
    assert "CREAM" in (out / "M2/README.md").read_text()  # the run's own card, where the run owns the file


def test_overwrite_after_a_lost_manifest_removes_the_longer_runs_later_iterations_and_rounds(
    tmp_path, m0, tokenizer, prompts
):
    out = tmp_path / "run"
    user_files(out)
    mine = tree(out)
    make(out, m0, tokenizer, prompts, num_iterations=2).train()
    _truncate(out / "cream_state/manifest.json")
    make(out, m0, tokenizer, prompts, overwrite_output_dir=True).train()  # 1 round
    assert not (out / "M3").exists() and not (out / "rounds/round_2").exists()
    assert (out / "M2").is_dir() and {k: v for k, v in tree(out).items() if k in mine} == mine


def test_an_iteration_holding_nan_weights_is_named_not_blamed_on_half_precision(finished_run, m0):
    path = finished_run / "M1" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(
        DamagedFile, match=r"M1/model\.safetensors holds NaN or inf in 1 tensor\(s\) \(first: model\.norm\.weight\)"
    ):
        load_full_weights(copy.deepcopy(m0), finished_run / "M1")


_HANGING_PUSH = """
import os, signal, sys, threading
from pathlib import Path
from trl_cream.hub import HubPublisher, HubSettings

class Hangs:
    endpoint = "https://huggingface.co"
    def create_repo(self, *args, **kwargs):
        print("pushing", flush=True)
        threading.Event().wait()  # a push that never returns

folder = Path(sys.argv[1]) / "M1"
folder.mkdir(parents=True)
(folder / "README.md").write_text("a card")
publisher = HubPublisher(HubSettings(output_dir=folder.parent, hub_model_id="me/cream", token="hf_x"), api=Hangs())
publisher.submit(1, folder)
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # the user's first Ctrl-C
publisher.wait()
"""


def test_a_first_ctrl_c_while_a_push_hangs_stops_the_run_and_says_the_push_is_retried_on_resume(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    child = subprocess.run(
        [sys.executable, "-c", _HANGING_PUSH, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert child.returncode != 0 and "KeyboardInterrupt" in child.stderr, child.stderr[-2000:]
    assert "Interrupted while pushing M1 to the Hub: the run stops now" in child.stderr
    assert "retried when the run is resumed" in child.stderr
