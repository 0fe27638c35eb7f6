"""Implicit rewards, the round-1 baseline, ranks and best/worst pairs."""

import numpy as np
import pytest
import torch
from scipy import stats

from trl_cream.core.rewards import baseline_rewards, implicit_rewards, rank_descending, select_pairs


def test_implicit_reward_is_policy_minus_initial():
    policy = torch.tensor([[-3.0, -5.0], [-1.0, -2.0]])
    initial = torch.tensor([[-4.0, -4.0], [-1.5, -1.0]])
    assert implicit_rewards(policy, initial).tolist() == [[1.0, -1.0], [0.5, -1.0]]


def test_baseline_from_round_two_uses_previous_checkpoint():
    previous = torch.tensor([[-2.0, -6.0]])
    initial = torch.tensor([[-4.0, -4.0]])
    lengths = torch.tensor([[2, 8]])
    assert baseline_rewards(previous, initial, lengths).tolist() == [[2.0, -2.0]]


def test_round_one_baseline_is_length_normalised_initial_likelihood():
    initial = torch.tensor([[-4.0, -6.0, -9.0]])
    lengths = torch.tensor([[2, 6, 3]])
    assert baseline_rewards(None, initial, lengths).tolist() == [[-2.0, -1.0, -3.0]]


def test_round_one_sum_logp_baseline_ranks_by_summed_likelihood_and_can_reverse_mean_logp():
    initial = torch.tensor([[-4.0, -6.0, -9.0]])
    lengths = torch.tensor([[2, 6, 3]])
    summed = baseline_rewards(None, initial, lengths, "sum_logp")
    assert summed.tolist() == [[-4.0, -6.0, -9.0]]
    mean = baseline_rewards(None, initial, lengths, "mean_logp")
    assert summed.argmax().item() == 0 and mean.argmax().item() == 1  # the two forms disagree on the best here
    # From round 2 on the choice does not matter: r' = log π_{t-1} - log π_0.
    previous = torch.tensor([[-2.0, -6.0, -1.0]])
    assert torch.equal(
        baseline_rewards(previous, initial, lengths, "sum_logp"), baseline_rewards(previous, initial, lengths)
    )
    with pytest.raises(ValueError, match="round1_baseline='median'"):
        baseline_rewards(None, initial, lengths, "median")


def test_select_pairs_best_vs_worst():
    rewards = torch.tensor([[0.1, 0.9, -0.3, 0.2], [2.0, -1.0, 0.0, 1.0]])
    pairs = select_pairs(rewards, 0.7)
    assert pairs.prompt_index.tolist() == [0, 1]
    assert pairs.chosen_index.tolist() == [1, 0]
    assert pairs.rejected_index.tolist() == [2, 1]
    assert pairs.consistency.tolist() == pytest.approx([0.7, 0.7])
    assert pairs.num_tied == 0


def test_tied_prompts_are_counted_and_per_sample_c_stays_with_its_prompt():
    rewards = torch.tensor(
        [
            [0.0, 1.0, 2.0],
            [5.0, 5.0, 5.0],  # all tied: no pair
            [3.0, 1.0, 2.0],
            [0.0, 0.0, 0.0],  # all tied: no pair
            [1.0, 2.0, 0.0],
        ]
    )
    c = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    pairs = select_pairs(rewards, c)
    assert pairs.tied_prompts.tolist() == [1, 3]
    assert pairs.num_tied == 2 and pairs.num_pairs == 3
    assert pairs.prompt_index.tolist() == [0, 2, 4]
    # The official code zipped the C list onto the surviving pairs, giving [0.1, 0.2, 0.3] here.
    assert pairs.consistency.tolist() == [0.1, 0.3, 0.5]


def test_select_pairs_rejects_a_misaligned_consistency_vector():
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        select_pairs(torch.zeros(2, 3), torch.zeros(3))


def test_rank_descending_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (40, 5), generator=generator).double()
    np.testing.assert_allclose(rank_descending(rewards).numpy(), stats.rankdata(-rewards.numpy(), axis=1))
