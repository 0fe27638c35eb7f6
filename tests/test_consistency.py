"""Rank statistics, cross-checked against scipy.stats on data with many ties, and hand-worked cases."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from trl_cream.core.consistency import average_ranks, consistency_rate, kendall_tau, spearman, top_order


@pytest.fixture()
def tied_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """300 prompts x 5 candidates with values in {0, 1, 2}: ties everywhere, some rows entirely tied."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (300, 5), generator=generator).double()
    y = torch.randint(0, 3, (300, 5), generator=generator).double()
    x[:3] = 1.0  # rows with no ranking at all
    return x, y


def _row_stat(fn, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    out = []
    for a, b in zip(x.numpy(), y.numpy()):
        with np.errstate(all="ignore"):
            out.append(fn(a, b).statistic)
    return np.array(out, dtype=float)


def test_kendall_tau_b_matches_scipy_with_ties(tied_scores):
    x, y = tied_scores
    ours = kendall_tau(x, y).numpy()
    reference = _row_stat(lambda a, b: stats.kendalltau(a, b, variant="b"), x, y)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
    assert np.isnan(ours[:3]).all()
    np.testing.assert_allclose(ours[~np.isnan(ours)], reference[~np.isnan(reference)], atol=1e-12)


def test_kendall_tau_on_continuous_scores_matches_scipy():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 7, generator=generator), torch.randn(50, 7, generator=generator)
    np.testing.assert_allclose(kendall_tau(x, y).numpy(), _row_stat(stats.kendalltau, x, y), atol=1e-12)


def test_spearman_matches_scipy_with_ties(tied_scores):
    x, y = tied_scores
    ours = spearman(x, y).numpy()
    reference = _row_stat(stats.spearmanr, x, y)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
    np.testing.assert_allclose(ours[~np.isnan(ours)], reference[~np.isnan(reference)], atol=1e-12)


def test_average_ranks_match_scipy_rankdata(tied_scores):
    x, _ = tied_scores
    np.testing.assert_allclose(average_ranks(x).numpy(), stats.rankdata(x.numpy(), axis=1), atol=0)


def test_kendall_does_not_break_ties_by_index():
    # Ordinal tie-breaking would rank [1, 1, 0] as 1 > 2 > 3 and call it identical to [2, 1, 0] (tau = 1).
    x = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([[2.0, 1.0, 0.0]])
    tau = kendall_tau(x, y).item()
    assert tau == pytest.approx(2 / math.sqrt(2 * 3))
    assert tau < 1


def test_top_order_hand_worked():
    x = torch.tensor([[3.0, 1.0, 2.0]] * 4)
    y = torch.tensor(
        [
            [5.0, 0.0, 1.0],  # same best (0) and worst (1)
            [0.0, 5.0, 1.0],  # best and worst swapped
            [5.0, 1.0, 0.0],  # same best, different worst
            [5.0, 5.0, 0.0],  # x's best is tied for y's best, but x's worst is not y's worst
        ]
    )
    assert top_order(x, y).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert top_order(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[4.0, 0.0, 0.0]])).tolist() == [1.0]


def test_consistency_rate_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # tau = 1, -1, 1/3 -> C = 1, 0, 2/3
    sample = consistency_rate(x, y, "kendall", "sample")
    assert sample.tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert consistency_rate(x, y, "kendall", "dataset").item() == pytest.approx(5 / 9)
    # rho = 1, -1, 0.5 -> C = 1, 0, 0.75
    assert consistency_rate(x, y, "spearman", "sample").tolist() == pytest.approx([1.0, 0.0, 0.75])
    assert consistency_rate(x, y, "toporder", "sample").tolist() == [1.0, 0.0, 0.0]
    assert consistency_rate(x, y, "none", "sample").tolist() == [1.0, 1.0, 1.0]
    assert consistency_rate(x, y, "none", "dataset").item() == 1.0


def test_undefined_rows_are_neutral_per_sample_and_excluded_from_the_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([[1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
    assert consistency_rate(x, y, "kendall", "sample").tolist() == [1.0, 0.5]
    assert consistency_rate(x, y, "kendall", "dataset").item() == 1.0
    assert consistency_rate(y[1:], y[1:], "kendall", "dataset").item() == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"measure": "pearson"}, "Unknown consistency measure 'pearson'"),
        ({"granularity": "batch"}, "Unknown consistency granularity 'batch'"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message):
        consistency_rate(x, x, **kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        kendall_tau(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        spearman(torch.zeros(2, 1), torch.zeros(2, 1))


def test_round_statistics_leave_fully_tied_prompts_out_everywhere() -> None:
    """Training logs, the evaluation's Table 2 and the study's round-1 baselines share one definition: a prompt whose
    ranking is entirely tied has no ranking, so it is out of every mean (TopOrder too) and counted as undefined."""
    from trl_cream.core.consistency import round_statistics
    from trl_cream.core.labelling import RoundScores, label_round
    from trl_cream.evaluation import consistency_stats

    initial = torch.zeros(3, 4)
    policy = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])  # prompt 2: all tied
    previous = torch.tensor([[4.0, 3.0, 1.0, 2.0], [4.0, 3.0, 2.0, 1.0], [2.0, 2.0, 2.0, 2.0]])  # prompt 2: tied
    stats = round_statistics(policy, previous)
    # Hand-worked: prompt 0 τ = (5 − 1) / 6, prompt 1 τ = −1; TopOrder 0 (worst differs) and 0; prompt 2 undefined.
    assert stats["num_defined"] == 2 and stats["num_undefined"] == 1
    assert stats["kendall_tau"]["mean"] == pytest.approx((4 / 6 - 1) / 2)
    assert stats["top_order"]["mean"] == 0.0  # the tied prompt would have counted as 1 ("agreeing"): it is left out
    assert stats["frac_tau_negative"] == 0.5  # of the 2 defined prompts, not of all 3
    assert stats["per_prompt"]["top_order"][2] is None
    assert consistency_stats(policy, previous) == stats
    scores = RoundScores(policy=policy, initial=initial, previous=previous, lengths=torch.ones(3, 4, dtype=torch.long))
    logged = label_round(scores, "kendall", "dataset").metrics
    assert logged["toporder_mean"] == stats["top_order"]["mean"]
    assert logged["kendall_tau_mean"] == pytest.approx(stats["kendall_tau"]["mean"])
    assert logged["frac_tau_negative"] == stats["frac_tau_negative"]
    assert logged["num_tau_undefined"] == 1
