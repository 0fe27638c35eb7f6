"""The opt-in speed-ups of trl_cream/perf.py: exact by construction, checked here; their speed is in benchmarks/."""

from __future__ import annotations

import gc
import weakref

import torch
from conftest import cream_args, perturbed
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import GenerationConfig

from trl_cream import CreamTrainer
from trl_cream.modeling.perf import frozen_gc, sampled_policy_scores
from trl_cream.modeling.sampling import generate_candidates, tokenize_prompts
from trl_cream.modeling.scoring import score_candidates


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_gc_freezes_only_inside_and_still_collects_new_cycles():
    old = _Node()
    old_ref = weakref.ref(old)
    with frozen_gc():
        assert gc.get_freeze_count() > 0
        new = _Node()
        new_ref = weakref.ref(new)
        del old, new
        gc.collect()
        assert new_ref() is None  # created inside the block: collected as usual
        assert old_ref() is not None  # frozen: left for after the block
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None


def test_frozen_gc_leaves_a_callers_freeze_and_can_be_disabled():
    with frozen_gc(enabled=False):
        assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_gc():
            pass
        assert gc.get_freeze_count() == frozen  # the caller's freeze is not undone
    finally:
        gc.unfreeze()


def test_freeze_gc_changes_no_number(finished_full_run, tmp_path, m0, tokenizer, prompts):
    """Two rounds with and without `freeze_gc`: the same pairs and bit-identical M2 and M3 (the shared finished run
    has `freeze_gc=True`, the default)."""
    assert finished_full_run.args.freeze_gc
    CreamTrainer(
        model=perturbed(m0),
        ref_model=m0,
        args=cream_args(tmp_path / "False", freeze_gc=False),
        train_dataset=prompts,
        processing_class=tokenizer,
    ).train()
    assert gc.get_freeze_count() == 0
    runs = {False: tmp_path / "False", True: finished_full_run.out}
    for m in ("M2", "M3"):
        a, b = (load_file(str(runs[flag] / m / "model.safetensors")) for flag in (False, True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(runs[True] / "M1" / "model.safetensors"))
    after = load_file(str(runs[True] / "M3" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the runs did train


def test_sampled_logps_match_the_scoring_forward(m0, tokenizer, prompts):
    """π_t's log-probs from the sampling pass (raw logits) agree with `score_candidates` (fp32, CPU) and the
    candidates themselves are unchanged by recording them."""
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:4])
    config = GenerationConfig(
        do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id
    )
    runs = []
    for sink in (None, []):
        torch.manual_seed(0)
        runs.append(generate_candidates(m0, tokenizer, prompt_ids, 3, config, 2, False, logps_out=sink))
    assert runs[0] == runs[1]
    forward = score_candidates(m0, prompt_ids, runs[1], tokenizer.pad_token_id, 512, show_progress=False)
    assert [len(r) for r in sink] == [3] * 4
    torch.testing.assert_close(torch.tensor(sink), forward, atol=1e-4, rtol=1e-5)
    assert forward.abs().min() > 0  # non-trivial scores


def test_sampled_policy_scores_share_duplicates_and_fall_back():
    prompts, cands = [[1, 2]], [[[5, 6], [7], [5, 6]]]
    scores = sampled_policy_scores([[-1.0, -2.0, -1.1]], prompts, cands, max_length=8)
    assert scores.tolist() == [[-1.0, -2.0, -1.0]]  # exact duplicates stay exact ties, as in score_candidates
    assert sampled_policy_scores(None, prompts, cands, 8) is None
    assert sampled_policy_scores([[-1.0, -2.0]], prompts, cands, 8) is None  # shape mismatch
    assert sampled_policy_scores([[-1.0, -2.0, -1.1]], prompts, cands, max_length=3) is None  # would be truncated


def test_policy_logps_from_sampling_in_a_round(finished_one_round_run, tmp_path, m0, tokenizer, prompts):
    """The opt-in path gives the same candidates and pairs, and π_t scores within the stated tolerance."""
    assert not finished_one_round_run.args.policy_logps_from_sampling  # the default: π_t scored by a forward
    a = load_from_disk(str(finished_one_round_run.out / "rounds" / "round_1" / "candidates"))
    CreamTrainer(
        model=perturbed(m0),
        ref_model=m0,
        args=cream_args(tmp_path, num_iterations=1, policy_logps_from_sampling=True),
        train_dataset=prompts,
        processing_class=tokenizer,
    ).train()
    b = load_from_disk(str(tmp_path / "rounds" / "round_1" / "candidates"))
    assert a["completion_input_ids"] == b["completion_input_ids"]
    torch.testing.assert_close(torch.tensor(b["logp_policy"]), torch.tensor(a["logp_policy"]), atol=1e-4, rtol=1e-5)
    assert a["logp_initial"] == b["logp_initial"]
