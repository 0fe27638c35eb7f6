"""Small, exact speed-ups of a CREAM round, each behind a `CreamConfig` switch (measured in `benchmarks/`).

`frozen_gc`: every full garbage collection (`gc.collect()`, which accelerate's `free_memory` and the Trainer's
start of training both run, as does the release of π_{t−1} after scoring) walks every object Python tracks, which
with torch, transformers, TRL and datasets imported is several hundred thousand objects, paid 4 times per round
(measured in `benchmarks/RESULTS.md`). Freezing the objects that already exist when a phase starts (`gc.freeze`) makes
those collections walk only what the phase itself created, which is where the optimizer state, the activations and
the loaded π_{t−1} live. Nothing numeric changes; garbage among the frozen objects is collected once the phase ends.

`sampled_policy_scores`: π_t's candidate scores from the sampling pass itself (`generate(output_logits=True)` gives
the raw logits), which saves one of the round's scoring forwards. Equal to the forward's scores up to floating-point
differences between the cached decode and the full forward (see `benchmarks/README.md` for the measured gap), hence
opt-in (`policy_logps_from_sampling`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def frozen_gc(enabled: bool = True) -> Iterator[None]:
    """Move every object the garbage collector tracks now to its permanent generation for the duration of the block,
    then move them back.

    A no-op when ``enabled`` is false or when objects are frozen already (the caller's own `gc.freeze`, e.g. before
    forking workers, is left as it is).

    Args:
        enabled (`bool`, *optional*, defaults to `True`): whether to freeze.
    """
    if not enabled or gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def sampled_policy_scores(
    logps: Sequence[Sequence[float]] | None,
    prompt_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    max_length: int,
) -> torch.Tensor | None:
    """π_t's ``[num_prompts, N]`` scores taken from the sampling pass (`policy_logps_from_sampling`), or `None` when
    the scoring forward must run instead.

    `None` when nothing was recorded, when the shapes do not match the candidates, or when a prompt + candidate is
    longer than ``max_length`` (the forward then drops the oldest prompt tokens, so its score would differ). Exact
    duplicates of one prompt share the first one's score, as in `score_candidates`, so that they stay exact ties.
    """
    if logps is None or [len(row) for row in logps] != [len(c) for c in candidates]:
        return None
    if any(len(p) + len(c) > max_length for p, cands in zip(prompt_ids, candidates, strict=True) for c in cands):
        return None
    rows = []
    for row, cands in zip(logps, candidates, strict=True):
        first: dict[tuple[int, ...], float] = {}
        rows.append([first.setdefault(tuple(c), v) for c, v in zip(cands, row, strict=True)])
    return torch.tensor(rows, dtype=torch.float32)
