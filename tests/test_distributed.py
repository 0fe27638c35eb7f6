"""A round split across processes: the shard/gather helpers, and a 2-process CPU run (torchrun, gloo) that must give
the same C, pairs and weights as 1 process fed the same candidates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from conftest import perturbed, tiny_llama
from datasets import load_from_disk
from safetensors.torch import load_file

from trl_cream import distributed, engines
from trl_cream.core.labelling import RoundScores
from trl_cream.modeling.scoring import score_candidates

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "dist_worker.py"


class FakeState:
    """Rank ``process_index`` of ``num_processes``, splitting with accelerate's own `split_between_processes`."""

    def __init__(self, num_processes: int, process_index: int) -> None:
        self.num_processes, self.process_index = num_processes, process_index

    def split_between_processes(self, inputs, apply_padding=False):
        return PartialState.split_between_processes(self, inputs, apply_padding=apply_padding)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num_prompts", [1, 2, 5, 8, 9])
def test_shards_cover_every_prompt_once_and_lockstep_shards_are_equal(world, num_prompts):
    shards = [distributed.shard_round(num_prompts, FakeState(world, r)) for r in range(world)]
    assert sorted(j for s in shards for j in s.indices) == list(range(num_prompts))
    assert [j for s in shards for j in s.indices] == list(range(num_prompts))  # contiguous, in rank order
    assert max(len(s.indices) for s in shards) - min(len(s.indices) for s in shards) <= 1
    padded = [distributed.shard_round(num_prompts, FakeState(world, r), lockstep=True) for r in range(world)]
    assert len({len(s.indices) for s in padded}) == 1
    assert set(j for s in padded for j in s.indices) == set(range(num_prompts))


def test_rank_seeds_differ_across_ranks_and_rounds_and_rank0_keeps_the_single_process_seed():
    seeds = {distributed.rank_seed(42, t, r) for t in range(1, 4) for r in range(8)}
    assert len(seeds) == 24
    assert distributed.rank_seed(42, 2, 0) == 44


def _scores(rows: list[int], n: int, previous: bool) -> RoundScores:
    base = torch.tensor([[10.0 * j + i for i in range(n)] for j in rows])
    return RoundScores(policy=base, initial=-base, previous=base / 3 if previous else None, lengths=torch.zeros(0))


def test_gather_in_one_process_restores_order_and_drops_lockstep_padding():
    # One process: the "gather" is the identity, so the local shard must already be the whole round; a padded
    # shard (the last prompt repeated, as lockstep gives) keeps the first copy.
    shard = distributed.Shard(indices=[0, 1, 2, 2], num_prompts=3)
    cands = [[[j, i] * (i + 1) for i in range(2)] for j in shard.indices]
    candidates = distributed.gather_candidates(shard, cands)
    scores = distributed.gather_scores(shard, _scores(shard.indices, 2, previous=True), candidates)
    assert candidates == cands[:3]
    assert torch.equal(scores.policy, torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]))
    assert torch.equal(scores.initial, -scores.policy) and torch.allclose(scores.previous, scores.policy / 3)
    assert scores.lengths.tolist() == [[2, 4]] * 3
    assert distributed.gather_scores(shard, _scores(shard.indices, 2, previous=False), candidates).previous is None
    with pytest.raises(RuntimeError, match="covers 2 of 3 prompts"):
        distributed.gather_candidates(distributed.Shard([0, 1], 3), cands[:2])
    with pytest.raises(ValueError, match="2 prompts but 3 rows"):
        distributed.gather_candidates(distributed.Shard([0, 1], 2), cands[:3])
    assert shard.select(["a", "b", "c"]) == ["a", "b", "c", "c"]


def test_num_scoring_batches_counts_the_forwards_of_score_candidates(tokenizer):
    model = tiny_llama(tokenizer)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    prompts = [[5, 6, 7], [8, 9]]
    candidates = [[[20, 21], [20, 21], [22]], [[23, 24, 25], [26], [27]]]  # one exact duplicate: scored once
    for batch_size in (1, 2, 4, 8):
        calls.clear()
        score_candidates(model, prompts, candidates, tokenizer.pad_token_id, 64, batch_size, show_progress=False)
        assert len(calls) == distributed.num_scoring_batches(candidates, batch_size)
    calls.clear()
    distributed.pad_forward_passes(model, 3, "cpu")
    assert len(calls) == 3
    # score_shard: the plain scores, no padding forward outside lockstep, an empty [0, 0] for an empty shard
    calls.clear()
    expected = score_candidates(model, prompts, candidates, tokenizer.pad_token_id, 64, 2, show_progress=False)
    got = distributed.score_shard(_accelerator(num_processes=1), model, prompts, candidates, tokenizer.pad_token_id,
                                  64, 2, show_progress=False)  # fmt: skip
    assert torch.equal(got, expected) and len(calls) == 2 * distributed.num_scoring_batches(candidates, 2)
    calls.clear()
    assert distributed.score_shard(_accelerator(), model, [], [], 0, 64, 2).shape == (0, 0) and not calls


def _accelerator(deepspeed=None, fsdp=None, num_processes=2):
    state = SimpleNamespace(deepspeed_plugin=deepspeed, fsdp_plugin=fsdp, num_processes=num_processes)
    return SimpleNamespace(state=state, device=torch.device("cpu"))


def _zero(stage: int, gather_on_save: bool = True):
    config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather_on_save}}
    return SimpleNamespace(zero_stage=stage, deepspeed_config=config)


def test_frozen_models_are_prepared_like_trl_reference_models(monkeypatch, tokenizer):
    import trl.models.utils as trl_utils

    seen = []
    monkeypatch.setattr(trl_utils, "prepare_deepspeed", lambda m, acc: seen.append("deepspeed") or m)
    monkeypatch.setattr(trl_utils, "prepare_fsdp", lambda m, acc: seen.append("fsdp") or m)
    model = tiny_llama(tokenizer).train()
    assert distributed.prepare_frozen(model, _accelerator(deepspeed=_zero(3))) is model and not model.training
    distributed.prepare_frozen(model, _accelerator(deepspeed=_zero(2)))
    distributed.prepare_frozen(model, _accelerator(fsdp=SimpleNamespace()))
    assert distributed.prepare_frozen(model, _accelerator()) is model  # DDP / 1 process: a plain copy on device
    assert seen == ["deepspeed", "deepspeed", "fsdp"]


def test_lockstep_checks_and_unsupported_setups_are_refused_up_front():
    assert distributed.needs_lockstep(_accelerator(deepspeed=_zero(3)))
    assert distributed.needs_lockstep(_accelerator(fsdp=SimpleNamespace()))
    assert not distributed.needs_lockstep(_accelerator(deepspeed=_zero(2)))
    assert not distributed.needs_lockstep(_accelerator())
    assert not distributed.needs_lockstep(_accelerator(deepspeed=_zero(3), num_processes=1))
    full = SimpleNamespace(state_dict_type="StateDictType.FULL_STATE_DICT")
    no_gather = _zero(2, gather_on_save=False)
    for ok in (
        _accelerator(),
        _accelerator(deepspeed=_zero(3)),
        _accelerator(deepspeed=no_gather),
        _accelerator(fsdp=full),
    ):
        distributed.check_supported(ok, use_peft=False)
    distributed.check_supported(_accelerator(deepspeed=_zero(2)), use_peft=True)
    with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
        distributed.check_supported(_accelerator(deepspeed=_zero(3, gather_on_save=False)), use_peft=False)
    with pytest.raises(ValueError, match="FULL_STATE_DICT"):
        sharded_dict = SimpleNamespace(state_dict_type="SHARDED_STATE_DICT")
        distributed.check_supported(_accelerator(fsdp=sharded_dict), use_peft=False)
    for sharded in (_accelerator(deepspeed=_zero(3)), _accelerator(fsdp=full)):
        with pytest.raises(ValueError, match="LoRA/QLoRA adapters are not supported"):
            distributed.check_supported(sharded, use_peft=True)


def test_the_paged_backend_is_refused_where_ranks_must_generate_in_step():
    full = SimpleNamespace(state_dict_type="FULL_STATE_DICT")
    for ok, gather in ((_accelerator(), True), (_accelerator(deepspeed=_zero(3)), True),
                       (_accelerator(fsdp=full, num_processes=1), False)):  # fmt: skip
        distributed.check_generation_backend(ok, "paged", gather)
    distributed.check_generation_backend(_accelerator(fsdp=full), "generate", False)  # generate syncs the ranks
    with pytest.raises(ValueError, match="cannot run under FSDP"):
        distributed.check_generation_backend(_accelerator(fsdp=full), "paged", True)
    with pytest.raises(ValueError, match="or set ds3_gather_for_generation=True"):
        distributed.check_generation_backend(_accelerator(deepspeed=_zero(3)), "paged", False)


def test_replicas_log_at_their_trainer_level(monkeypatch):
    import logging

    logger = logging.getLogger("trl_cream")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    fields = dict(deepspeed=None, fsdp=None, generation_backend="generate", ds3_gather_for_generation=True)
    main = SimpleNamespace(should_log=True, get_process_log_level=lambda: logging.INFO, **fields)
    distributed.setup(_accelerator(), main, use_peft=False)
    assert logger.level == logging.NOTSET  # the main process keeps the user's logging configuration
    replica = SimpleNamespace(should_log=False, get_process_log_level=lambda: logging.WARNING, **fields)
    distributed.setup(_accelerator(), replica, use_peft=False)
    assert logger.level == logging.WARNING
    with pytest.raises(ValueError, match="LoRA/QLoRA"):
        distributed.setup(_accelerator(deepspeed=_zero(3)), main, use_peft=True)


def test_full_model_is_saved_through_trainer_save_model_once_an_engine_exists(tmp_path):
    saved = []
    distributed.save_full_model(_accelerator(), None, None, saved.append, tmp_path / "M1")
    assert saved == [str(tmp_path / "M1")]  # DDP / FSDP / ZeRO-1/2, and ZeRO-3 once the engine exists
    distributed.save_full_model(_accelerator(deepspeed=_zero(3)), None, object(), saved.append, tmp_path / "M2")
    assert saved[-1] == str(tmp_path / "M2")


# ------------------------------------------------------------------------------------------ 2 processes vs 1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out: Path, modes: str, processes: int, batch: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER)]
    else:  # gloo on CPU; `accelerate launch --cpu --num_processes 2` would silently run one process
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(_free_port()), str(WORKER)]
    result = subprocess.run(command + [str(out), modes, str(batch), *extra], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    # CreamConfig turns DDP's find_unused_parameters off (every trainable parameter is used): no warning per rank
    assert "find_unused_parameters=True was specified" not in result.stderr
    for mode in modes.split(","):
        assert json.loads((out / mode / "world.json").read_text()) == {"world": processes, "batch": batch}
    return result


def sampled(out: Path) -> dict[int, list[tuple]]:
    per_rank = {}
    for path in sorted((out / "sampled").glob("rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        per_rank[int(path.stem[4:])] = [(r["round"], tuple(r["prompt_ids"]), r["n"]) for r in rows]
    return per_rank


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Full fine-tuning and LoRA, each run by 1 process and by 2 (one launch per world size: start-up dominates)."""
    root = tmp_path_factory.mktemp("dist")
    run_worker(root / "one", "full,lora", processes=1, batch=4)  # effective batch 4 = 4 x 1 process
    run_worker(root / "two", "full,lora", processes=2, batch=2)  # effective batch 4 = 2 x 2 processes
    return root


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_match_one_process_fed_the_same_candidates(launched, mode):
    one, two = launched / "one" / mode, launched / "two" / mode

    # The 2 ranks together sampled every prompt x N exactly once, and each only its own share.
    single, split = sampled(one), sampled(two)
    assert set(split) == {0, 1} and all(split.values())
    assert sorted(split[0] + split[1]) == sorted(single[0]) and len(single[0]) == 16
    assert not set(split[0]) & set(split[1])

    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    for t in (1, 2):
        a, b = (json.loads((d / "rounds" / f"round_{t}" / "metrics.json").read_text()) for d in (one, two))
        assert a["num_prompts"] == b["num_prompts"] == 8 and a["num_candidates"] == b["num_candidates"] == 32
        for key in ("consistency", "kendall_tau_mean", "spearman_mean", "num_pairs", "reward_margin_mean"):
            # metrics.json holds 6 significant digits: values 1e-7 apart can round one unit (1e-6 relative) apart
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        pa, pb = (load_from_disk(str(d / "rounds" / f"round_{t}" / "pairs")) for d in (one, two))
        for column in ("prompt_index", "chosen_input_ids", "rejected_input_ids", "consistency"):
            assert pa[column] == pb[column], column
        assert pb["ref_chosen_logps"] == pytest.approx(pa["ref_chosen_logps"], abs=1e-5)
        before, after = load_file(str(one / f"M{t}" / weights)), load_file(str(one / f"M{t + 1}" / weights))
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the round did train
    final_one, final_two = load_file(str(one / "M3" / weights)), load_file(str(two / "M3" / weights))
    assert final_one.keys() == final_two.keys()
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], atol=1e-4, rtol=1e-4)
    # Artifacts are written once, by the main process, with the whole round.
    assert len(load_from_disk(str(two / "rounds" / "round_2" / "candidates"))) == 32


def test_a_two_process_run_resumed_on_one_process_keeps_the_global_batch_and_gives_the_same_m3(launched, tmp_path):
    """Issue 23 item 4: killed while round 2 trains (its samples, scores and pairs saved; M3 not), then resumed on 1
    process with the same per-device batch: gradient accumulation 1 -> 2 keeps the global batch of 4."""
    import shutil

    out = tmp_path / "elastic"
    shutil.copytree(launched / "two" / "full", out / "full")
    shutil.rmtree(out / "full" / "M3")  # the state a kill during round 2's training leaves
    (out / "full" / "rounds" / "round_2" / "metrics.json").unlink()
    result = run_worker(out, "full", 1, 2, "resume")
    assert "Resuming on 1 process(es) instead of 2: gradient_accumulation_steps=2 (was 1) keeps the run's global " \
        "batch of 4" in result.stderr  # fmt: skip
    metrics = json.loads((out / "full" / "rounds" / "round_2" / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and "pair" in metrics["reused_phases"]
    final, uninterrupted = (
        load_file(str(out / "full" / "M3" / "model.safetensors")),
        load_file(str(launched / "two" / "full" / "M3" / "model.safetensors")),
    )
    for key in uninterrupted:
        torch.testing.assert_close(final[key], uninterrupted[key], atol=1e-4, rtol=1e-4)


def test_weights_check_can_fail(tokenizer):
    # The tolerance above is tight enough to tell apart two models one small perturbation away.
    a = tiny_llama(tokenizer)
    b = perturbed(a, scale=1e-3)
    with pytest.raises(AssertionError):
        for (_, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_zero3_full_state_dict_saves_a_from_pretrained_folder(monkeypatch, tmp_path, tokenizer):
    # No process group here: stand in for `deepspeed.zero.GatheredParameters` with a no-op (the weights are
    # then already whole), and check the rest of the pre-engine save path (`engines.full_state_dict`, the one
    # gatherer `distributed.save_full_model` uses for ZeRO-3 and FSDP): keys, values, one parameter per gather, and a
    # folder that from_pretrained reloads to the same logits.
    import contextlib
    import sys
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from transformers import AutoModelForCausalLM

    calls = []

    def gathered(params, modifier_rank=None):
        calls.append(len(params))
        return contextlib.nullcontext()

    model = tiny_llama(tokenizer)
    for param in model.parameters():
        param.ds_id = 0  # what zero.Init marks partitioned parameters with
    fake = ModuleType("deepspeed")  # with a spec and the engine class, for accelerate's unwrapping probe
    fake.__spec__ = ModuleSpec("deepspeed", None)
    fake.zero = SimpleNamespace(GatheredParameters=gathered)
    fake.DeepSpeedEngine = type("DeepSpeedEngine", (torch.nn.Module,), {})
    with monkeypatch.context() as patch:  # only around the gathers: transformers probes for a real deepspeed
        patch.setitem(sys.modules, "deepspeed", fake)
        state = engines.full_state_dict(model, is_main_process=True)
        assert engines.full_state_dict(model, is_main_process=False) == {}  # other ranks join the gathers
    reference = model.state_dict()
    assert set(state) <= set(reference)
    assert not any("inv_freq" in name for name in state)
    assert all(torch.equal(state[name], reference[name]) for name in state)
    assert calls == [1] * (2 * len(list(model.parameters())))  # every parameter gathered alone, buffers (no ds_id) not
    model.save_pretrained(tmp_path, state_dict=state)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
