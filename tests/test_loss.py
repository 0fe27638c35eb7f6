"""The CREAM loss against TRL's own DPO loss, conservative DPO, and Lemma 3.2's regulariser."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed, tiny_llama, tiny_tokenizer
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trl_cream.core.loss import cream_dpo_loss, pair_metrics
from trl_cream.modeling.scoring import completion_logps, pad_pairs

BETA = 0.1


def test_c_equal_one_is_trls_sigmoid_dpo_loss(tmp_path):
    """Same models, same pairs: TRL's DPOTrainer loss equals ours with C = 1 (log-probs computed independently)."""
    tok = tiny_tokenizer()
    m0 = tiny_llama(tok)
    m1 = perturbed(m0, scale=0.2)
    data = Dataset.from_dict(
        {
            "prompt": ["What is 3 plus 4?", "Name a mammal.", "Say hello."],
            "chosen": [" The answer is 7.", " A whale.", " Hello, how are you today?"],
            "rejected": [" 12", " The answer is a frog, not a whale.", " I am fine."],
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", beta=BETA, max_length=128,
    )  # fmt: skip
    trainer = DPOTrainer(model=m1, ref_model=m0, args=args, train_dataset=data, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        prompts = [r["prompt_ids"] for r in rows] * 2
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        tensors = pad_pairs(prompts, completions, tok.pad_token_id)
        policy_c, policy_r = completion_logps(trainer.model, *tensors).sum(-1).chunk(2)
        ref_c, ref_r = completion_logps(m0, *tensors).sum(-1).chunk(2)
    ours = cream_dpo_loss(policy_c, policy_r, ref_c, ref_r, 1.0, BETA).mean().item()
    assert ours == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the models differ, so the check is not trivially log 2


def _logps(seed: int, n: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=generator, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("c", [0.0, 0.2, 0.5, 0.9])
def test_constant_c_is_conservative_dpo_with_label_smoothing(c):
    pc, pr, rc, rr = _logps(1)
    ours = cream_dpo_loss(pc, pr, rc, rr, c, BETA)
    eps = 1 - c
    for k in range(len(pc)):
        z = BETA * ((pc[k] - rc[k]) - (pr[k] - rr[k])).item()
        expected = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
        assert ours[k].item() == pytest.approx(expected, rel=1e-12)


def test_per_pair_c_weights_each_pair():
    pc, pr, rc, rr = _logps(2, 3)
    c = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    losses = cream_dpo_loss(pc, pr, rc, rr, c, BETA)
    swapped = cream_dpo_loss(pr, pc, rr, rc, 1.0, BETA)  # DPO(y-, y+)
    straight = cream_dpo_loss(pc, pr, rc, rr, 1.0, BETA)
    torch.testing.assert_close(losses, c * straight + (1 - c) * swapped)


def _grad_wrt_margin(c: float, z: float) -> float:
    """dL/dz via autograd, with z the β-scaled margin over the reference."""
    policy_chosen = torch.tensor([z / BETA], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    cream_dpo_loss(policy_chosen, zero, zero, zero, c, BETA).sum().backward()
    return policy_chosen.grad.item() / BETA


def test_c_half_gradient_vanishes_only_at_zero_margin_and_pulls_back_to_it():
    assert _grad_wrt_margin(0.5, 0.0) == 0.0
    for z in (0.3, 1.0, 4.0):
        assert _grad_wrt_margin(0.5, z) > 1e-3  # descent lowers a positive margin
        assert _grad_wrt_margin(0.5, -z) < -1e-3  # and raises a negative one


@pytest.mark.parametrize("c, z", [(0.9, 0.0), (0.7, 1.5), (0.2, -2.0), (1.0, 0.4)])
def test_gradient_closed_form(c, z):
    sig = 1 / (1 + math.exp(-z))
    assert _grad_wrt_margin(c, z) == pytest.approx((1 - c) * sig - c * (1 - sig), rel=1e-9)


def test_consistency_out_of_range_is_refused():
    pc, pr, rc, rr = _logps(3, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cream_dpo_loss(pc, pr, rc, rr, 1.5, BETA)


def test_pair_metrics_are_the_implicit_rewards_of_each_candidate():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-4.0, -3.0])
    metrics = pair_metrics(chosen, rejected, ref_chosen, ref_rejected, torch.tensor([0.9, 0.2]), 0.1)
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.05, -0.1]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([0.0, 0.1]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.05, -0.2]))
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["cream/batch_consistency"].tolist() == pytest.approx([0.9, 0.2])
    assert metrics["beta"].tolist() == pytest.approx([0.1, 0.1])
    # the margin is the DPO logit z, whose loss at C = 1 is -log σ(z)
    z = metrics["rewards/margins"]
    torch.testing.assert_close(cream_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 1.0, 0.1), -F.logsigmoid(z))
