"""Resume after a SIGKILL in every phase of round 2, compared with one uninterrupted run; the manifest checks.

The children run tests/resume_child.py (a CreamTrainer subclass that kills itself at a chosen point). They are
forked from a multiprocessing fork server that imported torch/transformers once, so a child costs its work only.
Each kill point is resumed by the next child of a chain, which is killed at the next point:

    sampling -> scoring -> training (mid-epoch, after an intra-round checkpoint) -> saving -> pushing -> finished
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
from pathlib import Path

import pytest
import resume_child
import torch
from conftest import QUESTIONS, cream_args, perturbed
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

from trl_cream import CreamTrainer
from trl_cream.runs.files import atomic_dir
from trl_cream.runs.manifest import manifest_differences, public_config
from trl_cream.runs.store import PhaseStore
from trl_cream.trainer.resume import elastic_accumulation


@pytest.fixture(scope="module")
def fork_server():
    """A fork server that has imported torch, transformers and trl_cream once (via resume_child).

    Python 3.11's fork server ignores the parent's sys.path when it preloads, so tests/ goes on its PYTHONPATH; a
    failed preload would be silent and cost every child ~10 s of imports."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["resume_child"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([saved] if saved else [])])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def run_child(ctx, out: Path, kill_at: str, resume: bool | str = False, lora: bool = False) -> list[dict]:
    """Run one child; returns the events it recorded. A killed child must have died of SIGKILL."""
    events = out.parent / f"{out.name}.{kill_at}.{'resume' if resume else 'start'}.jsonl"
    process = ctx.Process(target=resume_child.main, args=(out, events, kill_at, resume, lora))
    process.start()
    process.join(timeout=600)
    assert process.exitcode == (0 if kill_at == "none" else -9), (kill_at, process.exitcode)
    return [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


def weights(path: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (path / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(path / name))


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def work(events: list[dict], kind: str) -> list[int]:
    return [e["round"] for e in events if e["event"] == kind]


def assert_same_run(ref: Path, out: Path) -> None:
    a, b = weights(ref / "M3"), weights(out / "M3")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert any(not torch.equal(weights(ref / "M2")[k], a[k]) for k in a)  # round 2 did train
    for name in ("samples", "pairs"):
        x, y = load_from_disk(str(ref / "rounds/round_2" / name)), load_from_disk(str(out / "rounds/round_2" / name))
        assert x.to_dict() == y.to_dict(), name
    m_ref = json.loads((ref / "rounds/round_2/metrics.json").read_text())
    m_out = json.loads((out / "rounds/round_2/metrics.json").read_text())
    assert m_ref["consistency"] == m_out["consistency"] and m_ref["num_pairs"] == m_out["num_pairs"] > 0
    assert not (out / "rounds/round_2/trainer_checkpoints").exists() and not (out / ".M3.partial").exists()


def test_sigkill_in_every_phase_of_round_2_then_resume_matches_an_uninterrupted_run(tmp_path, fork_server):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert work(run_child(fork_server, ref, "none"), "sampled") == [1, 2]

    events = run_child(fork_server, out, "sampling")
    assert work(events, "sampled") == [1, 2] and events[-1]["event"] == "killed"
    assert (out / "M2").is_dir() and not (out / "rounds/round_2/samples").exists()
    round_1 = {**mtimes(out / "rounds/round_1"), **{f"M2/{k}": v for k, v in mtimes(out / "M2").items()}}

    events = run_child(fork_server, out, "scoring", resume=True)
    assert work(events, "sampled") == [2] and work(events, "scored") == [2]  # round 1 is not redone
    assert (out / "rounds/round_2/samples").is_dir() and not (out / "rounds/round_2/scores.safetensors").exists()

    events = run_child(fork_server, out, "training", resume=True)
    assert work(events, "sampled") == [] and work(events, "scored") == [2]  # the candidates are loaded
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1]
    checkpoint = out / "rounds/round_2/trainer_checkpoints/checkpoint-2"
    assert (out / "rounds/round_2/pairs").is_dir() and (checkpoint / "model.safetensors").exists()
    assert not (checkpoint / "training_args.bin").exists()  # the pickled config is not kept

    events = run_child(fork_server, out, "saving", resume=str(checkpoint))  # the checkpoint named explicitly
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps and steps[0] == 2  # continued mid-epoch from checkpoint-2
    assert (out / ".M3.partial").is_dir() and not (out / "M3").exists()  # a half-saved M3 is never M3

    events = run_child(fork_server, out, "pushing", resume=True)
    assert work(events, "sampled") == [] and work(events, "scored") == []  # candidates and scores are loaded
    assert [e["step"] for e in events if e["event"] == "step"] == []  # resumed from the round's last checkpoint
    assert [e["index"] for e in events if e["event"] == "pushed"] == [3] and (out / "M3").is_dir()

    events = run_child(fork_server, out, "none", resume=True)
    assert [e["event"] for e in events] == ["pushed", "finished"]  # nothing is redone; only M3's push
    assert events[0]["index"] == 3 and (out / "cream_state/pushed/M3.json").exists()
    assert_same_run(ref, out)
    now = {**mtimes(out / "rounds/round_1"), **{f"M2/{k}": v for k, v in mtimes(out / "M2").items()}}
    assert now == round_1  # round 1's results and M2 were never rewritten


def test_lora_resume_restores_the_previous_adapter_and_the_policy(tmp_path, fork_server):
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_child(fork_server, ref, "none", lora=True)
    # Killed before round 2's scores were saved: the resume must reload π_{t-1} = M1 into `cream_previous`.
    run_child(fork_server, out, "scoring", lora=True)
    events = run_child(fork_server, out, "training", resume=True, lora=True)
    assert work(events, "sampled") == [] and work(events, "scored") == [2]
    events = run_child(fork_server, out, "none", resume=True, lora=True)
    assert work(events, "scored") == [] and events[-1]["event"] == "finished"
    assert_same_run(ref, out)


def _trainer(out: Path, m0, tokenizer, prompts, **overrides) -> CreamTrainer:
    args = cream_args(out, num_iterations=1, **overrides)
    return CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    )


def test_a_different_run_is_refused_on_resume_and_on_a_fresh_start(finished_run, tmp_path, m0, tokenizer, prompts):
    out = finished_run  # a copy of a finished `_trainer(out, m0, tokenizer, prompts).train()`
    with pytest.raises(ValueError, match=r"config\.learning_rate: 0\.005 -> 0\.001.*original settings"):
        _trainer(out, m0, tokenizer, prompts, learning_rate=1e-3).train(resume_from_checkpoint=True)
    other_prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q + "!"}] for q in QUESTIONS]})
    with pytest.raises(ValueError, match=r"datasets\.prompts"):
        _trainer(out, m0, tokenizer, other_prompts).train(resume_from_checkpoint=str(out))
    before = mtimes(out)
    with pytest.raises(
        ValueError, match=r"already holds a different CREAM run \(config\.seed: 0 -> 1.*overwrite_output"
    ):
        _trainer(out, m0, tokenizer, prompts, seed=1).train()
    assert mtimes(out) == before  # nothing was touched
    with pytest.raises(ValueError, match="holds no CREAM run to resume"):
        _trainer(tmp_path / "empty", m0, tokenizer, prompts).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="resumes from its output_dir"):
        _trainer(out, m0, tokenizer, prompts).train(resume_from_checkpoint=str(tmp_path))
    # A finished run resumes to the same result without any work; overwrite_output_dir replaces a different run.
    done = _trainer(out, m0, tokenizer, prompts).train(resume_from_checkpoint=True)
    assert mtimes(out) == before and done.metrics["rounds"][0]["round"] == 1
    _trainer(out, m0, tokenizer, prompts, seed=1, overwrite_output_dir=True).train()
    assert json.loads((out / "cream_state/manifest.json").read_text())["seeds"]["seed"] == 1


def test_manifest_and_saved_files_hold_no_secret_and_no_pickle(tmp_path, m0, tokenizer, prompts):
    secret = "hf_" + "x" * 30
    out = tmp_path / "run"
    _trainer(out, m0, tokenizer, prompts, hub_token=secret).train()
    assert "hub_token" not in public_config(cream_args(out, hub_token=secret))
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle"}, path


def test_atomic_dir_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "M2"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["M2"]
    assert PhaseStore(tmp_path).last_complete_round(2) == 1  # M2 = round 1 done; M3 missing
    shutil.rmtree(target)


def test_cli_resume_from_checkpoint_redoes_only_what_is_missing(tmp_path, capsys):
    from test_cli import _save_tiny

    from trl_cream import cli

    m0_dir, m1_dir = _save_tiny(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", str(m1_dir), "--ref_model_name_or_path", str(m0_dir),
            "--dataset_name", str(prompts), "--output_dir", str(out), "--num_iterations", "2",
            "--num_generations", "2", "--max_new_tokens", "6", "--max_length", "64", "--use_cpu",
            "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "2", "--dtype", "float32", "--disable_tqdm", "true"]  # fmt: skip
    assert cli.main(argv) == 0
    m3 = weights(out / "M3")
    round_1 = mtimes(out / "rounds/round_1")
    # A crash while M3 was being saved: M3 and round 2's metrics are missing, its candidates/scores/pairs are there.
    shutil.rmtree(out / "M3")
    (out / "rounds/round_2/metrics.json").unlink()
    samples = mtimes(out / "rounds/round_2/samples")
    capsys.readouterr()
    assert cli.main([*argv, "--resume_from_checkpoint"]) == 0
    captured = capsys.readouterr()  # the CLI's `trl_cream` log handler (INFO) says what the resume did
    for message in ("samples reused from", "scores reused from", "pairs reused from",
                    "Resuming round 2: training runs from the round's start"):  # fmt: skip
        assert message in captured.err, captured.err
    line = next(x for x in captured.out.splitlines() if x.startswith("CREAM round 2/2: "))
    assert "generate reused, score reused, pair reused, train " in line
    assert "| round | C |" in captured.out  # the final table
    metrics = json.loads((out / "rounds/round_2/metrics.json").read_text())
    assert metrics["reused_phases"] == ["generate", "pair", "score"]
    assert "reused / reused / reused /" in (out / "M3" / "README.md").read_text()
    assert mtimes(out / "rounds/round_1") == round_1 and mtimes(out / "rounds/round_2/samples") == samples
    again = weights(out / "M3")
    assert max((m3[k] - again[k]).abs().max().item() for k in m3) <= 1e-5
    with pytest.raises(ValueError, match=r"config\.learning_rate: 0\.001 -> 0\.002"):
        cli.main([*argv, "--learning_rate", "2e-3", "--resume_from_checkpoint", "true"])


def test_saved_scores_keep_the_external_reward_and_baseline(tmp_path):
    """A resume after the scoring phase must rank by the same reward-model / judge scores, not the implicit reward."""
    from trl_cream.core.labelling import RoundScores

    store = PhaseStore(tmp_path, 1, is_main=True)
    base = torch.arange(6, dtype=torch.float32).view(2, 3)
    lengths, metrics = torch.ones(2, 3, dtype=torch.long), {"judge_parse_failures": 1.0}
    scores = RoundScores(base, -base, None, lengths, reward=base * 2, baseline=base + 0.5, reward_metrics=metrics)
    store.save_scores(1, scores)
    loaded = store.load_scores(1)
    assert torch.equal(loaded.reward, scores.reward) and torch.equal(loaded.baseline, scores.baseline)
    assert loaded.previous is None and loaded.reward_metrics == {"judge_parse_failures": 1.0}
    store.save_scores(2, RoundScores(policy=base, initial=-base, previous=base + 1, lengths=lengths))
    implicit = store.load_scores(2)
    assert implicit.reward is None and implicit.baseline is None and torch.equal(implicit.previous, base + 1)


# ---------------------------------------------------------------- issue 23 item 4: another number of processes
def _world(processes: int, batch: int = 2, accumulation: int = 1) -> dict:
    config = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "seed": 0}
    return {"config": config, "world": {"num_processes": processes}}


def test_a_resume_on_another_process_count_keeps_the_global_batch_or_is_refused_naming_both_counts():
    old = _world(2)
    new = _world(1)
    assert elastic_accumulation(old, new, 1) == 2  # 2 x 1 x 2 processes = 2 x 2 x 1 process
    assert manifest_differences(old, new) == []  # the run's own record is compared, not the new count
    assert elastic_accumulation(_world(4, accumulation=2), _world(8, accumulation=2), 8) == 1
    assert elastic_accumulation(old, _world(2), 2) is None  # the same count: nothing changes
    with pytest.raises(
        ValueError,
        match=r"on 3 process\(es\): it was started on 2 with a global batch of 4 \(per_device_train_batch_size=2 x "
        r"gradient_accumulation_steps=1 x 2 processes\).*4 is not a multiple of 6.*Resume on 2 processes",
    ):
        elastic_accumulation(old, _world(3), 3)
    with pytest.raises(ValueError, match=r"DeepSpeed's engine fixes the batch"):
        elastic_accumulation(old, _world(1), 1, deepspeed=True)
    older = {"config": old["config"]}  # recorded before the process count was: resumed as before
    assert elastic_accumulation(older, _world(1), 1) is None
    assert manifest_differences(older, _world(1)) == []
