"""The opt-in speed-ups of trl_cream/perf.py: exact by construction, checked here; their speed is in benchmarks/."""

from __future__ import annotations

import gc
import weakref

import torch
from conftest import cream_args, perturbed
from safetensors.torch import load_file

from trl_cream import CreamTrainer
from trl_cream.perf import frozen_gc


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


def test_freeze_gc_changes_no_number(tmp_path, m0, tokenizer, prompts):
    """Two rounds with and without `freeze_gc`: the same pairs and bit-identical M2 and M3."""
    for flag in (False, True):
        CreamTrainer(
            model=perturbed(m0),
            ref_model=m0,
            args=cream_args(tmp_path / str(flag), freeze_gc=flag),
            train_dataset=prompts,
            processing_class=tokenizer,
        ).train()
    assert gc.get_freeze_count() == 0
    for m in ("M2", "M3"):
        a, b = (load_file(str(tmp_path / str(flag) / m / "model.safetensors")) for flag in (False, True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(tmp_path / "True" / "M1" / "model.safetensors"))
    after = load_file(str(tmp_path / "True" / "M3" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the runs did train
