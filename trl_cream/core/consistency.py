"""Ranking-consistency measures between two reward models (paper Section 3.3 and 4.3.3).

CREAM ranks the ``N`` candidates of every prompt twice: with the current model's rewards ``r`` and with the
previous checkpoint's rewards ``r'``. The agreement between the two rankings is the consistency rate ``C`` that
weights the DPO loss (Eq. 3.7, Algorithm 1 line 11).

Every public function works row-wise on ``[num_prompts, N]`` tensors: row ``j`` holds the ``N`` scores of
prompt ``x_j``. Rankings are derived from the raw scores, so ties are ties, never broken by candidate index (the
official implementation's ordinal tie-breaking biases τ; Kendall's τ-b corrects for ties instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch

MEASURES: tuple[str, ...] = ("kendall", "spearman", "toporder", "none")
GRANULARITIES: tuple[str, ...] = ("dataset", "sample")


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(
            f"Expected two [num_prompts, N] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[1] < 2:
        raise ValueError(f"Ranking needs at least 2 candidates per prompt, got N={x.shape[1]}.")
    return x.double(), y.double()


def _pairwise_signs(x: torch.Tensor) -> torch.Tensor:
    """``sign(x_i - x_k)`` for every ordered pair of candidates: ``[P, N, N]``."""
    return torch.sign(x.unsqueeze(-1) - x.unsqueeze(-2))


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's τ-b between the rankings induced by ``x`` and ``y``, per row (Eq. 3.10, with tie correction).

    Without ties this is exactly Eq. 3.10: ``(concordant - discordant) / (N (N - 1) / 2)``. With ties, the
    denominator becomes ``sqrt((n0 - n1) (n0 - n2))`` where ``n1``/``n2`` count the tied pairs in ``x``/``y``
    (τ-b, as ``scipy.stats.kendalltau``). A row in which ``x`` or ``y`` is entirely tied has no ranking, and its τ
    is ``nan``, again as scipy.

    Args:
        x (`torch.Tensor`): Scores ``[num_prompts, N]``, e.g. the current model's rewards.
        y (`torch.Tensor`): Scores ``[num_prompts, N]``, e.g. the previous model's rewards.

    Returns:
        `torch.Tensor`: τ-b of each row, ``[num_prompts]``, float64, in ``[-1, 1]`` or ``nan``.
    """
    x, y = _check_pair(x, y)
    n = x.shape[1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    sx, sy = _pairwise_signs(x)[:, upper], _pairwise_signs(y)[:, upper]
    n0 = n * (n - 1) / 2
    n1 = (sx == 0).sum(-1).double()
    n2 = (sy == 0).sum(-1).double()
    s = (sx * sy).sum(-1)
    denominator = torch.sqrt((n0 - n1) * (n0 - n2))
    return torch.where(denominator > 0, s / denominator.clamp_min(1e-300), torch.full_like(s, float("nan")))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate within its row, 1 = lowest score, ties sharing their average rank.

    This is ``scipy.stats.rankdata(method="average")`` applied row-wise.
    """
    signs = _pairwise_signs(x.double())
    below = (signs > 0).sum(-1).double()
    tied = (signs == 0).sum(-1).double()  # includes the candidate itself
    return below + (tied + 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation ρ per row: the Pearson correlation of the average ranks (Section 4.3.3).

    Args:
        x (`torch.Tensor`): Scores ``[num_prompts, N]``.
        y (`torch.Tensor`): Scores ``[num_prompts, N]``.

    Returns:
        `torch.Tensor`: ρ of each row, ``[num_prompts]``, float64, ``nan`` where a row is entirely tied.
    """
    x, y = _check_pair(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    denominator = torch.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    s = (rx * ry).sum(-1)
    return torch.where(denominator > 0, s / denominator.clamp_min(1e-300), torch.full_like(s, float("nan")))


def top_order(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TopOrder per row (Section 4.3.1): 1 if ``x``'s best and worst candidates are also ``y``'s best and worst.

    ``TopOrder_j = 1[argmax J_j = argmax K_j] * 1[argmin J_j = argmin K_j]``. With ties, the candidate picked by
    ``x`` (the one a preference pair would use) agrees when it attains ``y``'s maximum (respectively minimum),
    so ties in ``y`` are never broken against it by index.

    Returns:
        `torch.Tensor`: ``[num_prompts]`` float64 of 0s and 1s.
    """
    x, y = _check_pair(x, y)
    best, worst = x.argmax(-1, keepdim=True), x.argmin(-1, keepdim=True)
    best_agrees = y.gather(-1, best).squeeze(-1) == y.max(-1).values
    worst_agrees = y.gather(-1, worst).squeeze(-1) == y.min(-1).values
    return (best_agrees & worst_agrees).double()


def per_prompt_consistency(x: torch.Tensor, y: torch.Tensor, measure: str) -> torch.Tensor:
    """Consistency of each prompt in ``[0, 1]`` (``nan`` where undefined) for the chosen ``measure``.

    ``kendall``: ``(τ + 1) / 2`` (Algorithm 1 line 11); ``spearman``: ``(ρ + 1) / 2``; ``toporder``: TopOrder;
    ``none``: 1 everywhere, which turns CREAM into the plain self-rewarding (SRLM) baseline.
    """
    if measure == "kendall":
        return (kendall_tau(x, y) + 1) / 2
    if measure == "spearman":
        return (spearman(x, y) + 1) / 2
    if measure == "toporder":
        return top_order(x, y)
    if measure == "none":
        _check_pair(x, y)
        return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    raise ValueError(f"Unknown consistency measure {measure!r}; choose one of {MEASURES}.")


def consistency_rate(
    x: torch.Tensor, y: torch.Tensor, measure: str = "kendall", granularity: str = "dataset"
) -> torch.Tensor:
    """The consistency rate ``C`` in ``[0, 1]`` that weights the CREAM loss (Eq. 3.7, Algorithm 1 line 11).

    Args:
        x (`torch.Tensor`): Current-model rewards ``r``, ``[num_prompts, N]``.
        y (`torch.Tensor`): Baseline rewards ``r'`` (previous checkpoint), ``[num_prompts, N]``.
        measure (`str`, *optional*, defaults to `"kendall"`): `"kendall"`, `"spearman"`, `"toporder"` or `"none"`.
        granularity (`str`, *optional*, defaults to `"dataset"`):
            `"dataset"` returns one scalar, the mean over prompts (the paper's choice); `"sample"` returns one ``C``
            per prompt, ``[num_prompts]``.

    Prompts where the measure is undefined (a ranking that is entirely tied carries no order) are left out of the
    dataset mean; per sample they get ``C = 0.5``, the uniform preference of Lemma 3.2 (no evidence either way).
    If no prompt is defined at all, the dataset ``C`` is 0.5 as well.

    Returns:
        `torch.Tensor`: float64 scalar (dataset) or ``[num_prompts]`` (sample).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown consistency granularity {granularity!r}; choose one of {GRANULARITIES}.")
    c = per_prompt_consistency(x, y, measure)
    if granularity == "sample":
        return torch.nan_to_num(c, nan=0.5)
    defined = ~torch.isnan(c)
    if not defined.any():
        return torch.tensor(0.5, dtype=torch.float64, device=c.device)
    return c[defined].mean()


def _mean_std(values: torch.Tensor) -> dict[str, float | None]:
    """Mean and population std (ddof = 0, as the paper's TopOrder column implies); `None` when there is no value."""
    if values.numel() == 0:
        return {"mean": None, "std": None}
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std(correction=0).item()}


def round_statistics(rewards: torch.Tensor, baseline: torch.Tensor) -> dict[str, Any]:
    """How much two rankings of the same candidates agree, over prompts: the one definition used by the training
    logs (`label_round`), the evaluation's Table 2 (`consistency_stats`) and the study's round-1 baselines.

    A prompt whose ``r`` or ``r'`` is entirely tied has no ranking: τ and ρ are undefined there, and TopOrder,
    which would call any two tied rankings "in agreement", says nothing either. Such prompts are left out of every
    mean and std (TopOrder and the fraction of negative τ included), so that all columns describe the same prompts;
    they are counted in ``num_undefined``. ``spearman`` is ρ in ``[-1, 1]``; ``spearman_normalized`` is
    ``(ρ + 1) / 2``, the scale the paper's Table 2 uses (its SRLM row has τ = -0.22 but "Spearman" 0.36).

    Args:
        rewards (`torch.Tensor`): ``r``, ``[num_prompts, N]``.
        baseline (`torch.Tensor`): ``r'``, ``[num_prompts, N]``.

    Returns:
        `dict`: ``{"consistency" | "kendall_tau" | "spearman" | "spearman_normalized" | "top_order": {"mean", "std"}
        (`None` when no prompt is defined), "frac_tau_negative", "num_prompts", "num_defined", "num_undefined",
        "per_prompt": {measure: list with None where undefined}}``.
    """
    tau, rho, top = kendall_tau(rewards, baseline), spearman(rewards, baseline), top_order(rewards, baseline)
    defined = ~(torch.isnan(tau) | torch.isnan(rho))
    top = torch.where(defined, top, torch.full_like(top, float("nan")))
    per_prompt = {
        "consistency": (tau + 1) / 2,
        "kendall_tau": tau,
        "spearman": rho,
        "spearman_normalized": (rho + 1) / 2,
        "top_order": top,
    }
    stats: dict[str, Any] = {name: _mean_std(values[defined]) for name, values in per_prompt.items()}
    num_defined = int(defined.sum())
    stats["frac_tau_negative"] = float((tau[defined] < 0).double().mean()) if num_defined else None
    stats.update(num_prompts=int(tau.numel()), num_defined=num_defined, num_undefined=int(tau.numel()) - num_defined)
    stats["per_prompt"] = {
        name: [None if math.isnan(v) else v for v in values.tolist()] for name, values in per_prompt.items()
    }
    return stats
