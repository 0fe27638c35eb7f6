"""The consistency-regularised DPO loss (paper Eq. 3.7, Algorithm 1 line 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cream_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    consistency: torch.Tensor | float,
    beta: float,
) -> torch.Tensor:
    """Per-pair CREAM loss ``C · L_DPO(y+, y-) + (1 - C) · L_DPO(y-, y+)``.

    With ``z = β [(log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-))]`` this is
    ``-C log σ(z) - (1 - C) log σ(-z)``, the soft-labelled DPO of Theorem 3.3: ``C = 1`` is TRL's sigmoid DPO loss,
    a constant ``C`` is conservative DPO with label smoothing ``ε = 1 - C``, and ``C = 0.5`` is the pure
    regulariser of Lemma 3.2, which pulls ``z`` toward 0 (the uniform preference).

    Args:
        policy_chosen_logps (`torch.Tensor`): ``Σ log π_θ(y+|x)`` over completion tokens, ``[num_pairs]``.
        policy_rejected_logps (`torch.Tensor`): ``Σ log π_θ(y-|x)``, ``[num_pairs]``.
        ref_chosen_logps (`torch.Tensor`): ``Σ log π_ref(y+|x)``, ``[num_pairs]``.
        ref_rejected_logps (`torch.Tensor`): ``Σ log π_ref(y-|x)``, ``[num_pairs]``.
        consistency (`torch.Tensor` or `float`): ``C`` in ``[0, 1]``, a scalar or one per pair.
        beta (`float`): DPO temperature β.

    Returns:
        `torch.Tensor`: the loss of each pair, ``[num_pairs]``.
    """
    c = torch.as_tensor(consistency, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    if torch.any((c < 0) | (c > 1)):
        raise ValueError(f"The consistency rate must lie in [0, 1], got {c.min().item()}..{c.max().item()}.")
    z = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -c * F.logsigmoid(z) - (1 - c) * F.logsigmoid(-z)


def pair_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    consistency: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """What a training step logs per pair, under TRL's DPO names: the implicit rewards ``β (log π − log π_ref)`` of
    the chosen and rejected candidates, their margin and whether it is positive, the log-probs, and ``C``.

    Args: as `cream_dpo_loss` (``consistency`` one value per pair).

    Returns:
        `dict[str, torch.Tensor]`: one ``[num_pairs]`` tensor per logged name.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen_logps,
        "logps/rejected": policy_rejected_logps,
        "cream/batch_consistency": consistency,
        "beta": torch.full_like(policy_chosen_logps, beta),
    }
