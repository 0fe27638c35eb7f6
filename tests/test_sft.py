"""Algorithm 1 end to end through the public API: SFT stage M0 -> M1, then CREAM rounds."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, cream_args
from datasets import Dataset, load_from_disk
from peft import LoraConfig
from safetensors.torch import load_file

from trl_cream import CreamTrainer
from trl_cream.trainer.sft import build_sft_trainer, prepare_sft_dataset, supports_assistant_only_loss

SFT_ROWS = [[{"role": "user", "content": q}, {"role": "assistant", "content": "The answer is 7."}] for q in QUESTIONS]


def sft_data() -> Dataset:
    return Dataset.from_dict({"messages": SFT_ROWS})


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_then_one_round(tmp_path, m0, tokenizer, prompts, use_lora):
    initial = {n: p.detach().clone() for n, p in m0.named_parameters()}
    # Per-prompt C: a dataset-level C of exactly 0.5 (possible with 8 prompts) would rightly train nothing.
    args = cream_args(
        tmp_path, num_iterations=1, sft_num_train_epochs=2, sft_learning_rate=5e-3, consistency_granularity="sample"
    )
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


ANSWER = "The answer is 7."
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _supervised(tmp_path, model, tokenizer, dataset) -> tuple[list[int], int]:
    """The token ids that carry a label in the first SFT example, and the example's length."""
    trainer = build_sft_trainer(model, tokenizer, dataset, cream_args(tmp_path))
    labels = trainer.data_collator([trainer.train_dataset[0]])["labels"][0]
    return labels[labels != -100].tolist(), len(labels)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "rows, chat",
    [
        ({"messages": [SFT_ROWS[0]]}, True),
        ({"prompt": [SFT_ROWS[0][:1]], "completion": [SFT_ROWS[0][1:]]}, True),
        (
            {
                "prompt": ["<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"],
                "completion": [ANSWER],
            },
            False,
        ),
    ],
    ids=["messages", "conversational-prompt-completion", "text-prompt-completion"],
)
def test_sft_supervises_the_answer_only(tmp_path, m0, tokenizer, rows, chat):
    supervised, total = _supervised(tmp_path, m0, tokenizer, Dataset.from_dict(rows))
    if chat:  # the answer, its end-of-turn token and the newline the template puts after it
        assert supervised == _ids(tokenizer, ANSWER + "<|im_end|>\n")
    else:  # a plain-text completion is trained as given, plus the eos that SFTTrainer appends
        assert supervised == _ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]
    assert total > len(supervised) + 5  # the user turn and the chat markup are in the input, not in the loss


def test_sft_keeps_earlier_turns_as_context(tmp_path, m0, tokenizer):
    conversation = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": ANSWER},
    ]
    supervised, _ = _supervised(tmp_path, m0, tokenizer, Dataset.from_dict({"messages": [conversation]}))
    assert supervised == _ids(tokenizer, ANSWER + "<|im_end|>\n")
    with pytest.raises(ValueError, match="needs an assistant turn"):
        _supervised(tmp_path, m0, tokenizer, Dataset.from_dict({"messages": [conversation[:1]]}))


def test_sft_uses_assistant_only_loss_when_the_template_has_generation_markers(tmp_path, m0, tokenizer):
    assert not supports_assistant_only_loss(tokenizer)  # the ChatML fixture, like SmolLM2's, has no markers
    tokenizer.chat_template = MARKED_TEMPLATE
    assert supports_assistant_only_loss(tokenizer)
    dataset = Dataset.from_dict({"messages": [SFT_ROWS[0]]})
    assert prepare_sft_dataset(dataset, tokenizer)[1] == {"assistant_only_loss": True}
    supervised, total = _supervised(tmp_path, m0, tokenizer, dataset)
    assert supervised == _ids(tokenizer, ANSWER + "<|im_end|>")
    assert total > len(supervised) + 5


def test_sft_on_text_rows_trains_on_the_whole_text(tmp_path, m0, tokenizer):
    text = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\nThe answer is 7.<|im_end|>\n"
    supervised, total = _supervised(tmp_path, m0, tokenizer, Dataset.from_dict({"text": [text]}))
    assert len(supervised) == total
