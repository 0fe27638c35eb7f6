"""Algorithm 1 end to end through the public API: SFT stage M0 -> M1, then CREAM rounds."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, cream_args
from datasets import Dataset, load_from_disk
from peft import LoraConfig
from safetensors.torch import load_file

from trl_cream import CreamTrainer

SFT_ROWS = [[{"role": "user", "content": q}, {"role": "assistant", "content": "The answer is 7."}] for q in QUESTIONS]


def sft_data() -> Dataset:
    return Dataset.from_dict({"messages": SFT_ROWS})


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_then_one_round(tmp_path, m0, tokenizer, prompts, use_lora):
    initial = {n: p.detach().clone() for n, p in m0.named_parameters()}
    args = cream_args(tmp_path, num_iterations=1, sft_num_train_epochs=2, sft_learning_rate=5e-3)
    trainer = CreamTrainer(
        model=m0,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        sft_dataset=sft_data(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_lora else None,
    )
    output = trainer.train()
    assert output.metrics["sft"]["sft_steps"] == 8  # 8 rows / batch 2 * 2 epochs
    assert (tmp_path / "M1").is_dir() and (tmp_path / "M2").is_dir()
    weights_file = "adapter_model.safetensors" if use_lora else "model.safetensors"
    m1, m2 = load_file(str(tmp_path / "M1" / weights_file)), load_file(str(tmp_path / "M2" / weights_file))
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)
    if use_lora:
        assert any("lora_B" in k and m1[k].abs().sum() > 0 for k in m1)  # SFT moved the adapter off the identity
        base = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in trainer.model.named_parameters()
        }
        assert all(torch.equal(base[n], initial[n]) for n in initial)  # π_0, the base, is untouched
    else:
        assert not torch.equal(m1["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
        ref = dict(trainer.ref_model.named_parameters())
        assert all(torch.equal(ref[n], initial[n]) for n in initial)  # π_0 is M0, not the SFT'd model
    pairs = load_from_disk(str(tmp_path / "rounds" / "round_1" / "pairs"))
    assert len(pairs) + output.metrics["rounds"][0]["num_tied_skipped"] == len(QUESTIONS)


def test_sft_inputs_are_validated(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path)
    with pytest.raises(ValueError, match="needs a `messages` column"):
        CreamTrainer(model=m0, args=args, train_dataset=prompts, processing_class=tokenizer, sft_dataset=prompts)
    with pytest.raises(ValueError, match="leave `ref_model=None`"):
        CreamTrainer(
            model=m0,
            ref_model=m0,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            sft_dataset=sft_data(),
        )


def test_sft_that_changes_nothing_is_refused(tmp_path, m0, tokenizer, prompts):
    args = cream_args(tmp_path, num_iterations=1, sft_num_train_epochs=1, sft_learning_rate=0.0)
    trainer = CreamTrainer(
        model=m0, args=args, train_dataset=prompts, processing_class=tokenizer, sft_dataset=sft_data()
    )
    with pytest.raises(ValueError, match="identical to the initial model"):
        trainer.train()
