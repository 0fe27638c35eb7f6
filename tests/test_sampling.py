"""Sampling and scoring run the model in eval mode and give it back in the mode it came in."""

import copy

import pytest
import torch
from conftest import cream_args, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from trl_cream.sampling import (
    generate_candidates,
    pad_pairs,
    pad_token_id,
    sampling_generation_config,
    score_candidates,
    tokenize_prompts,
)


def test_generate_and_score_use_eval_mode_and_restore_it(m0, tokenizer, prompts):
    seen: list[bool] = []
    m0.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(module.training))
    m0.train()
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:2])
    config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id)
    candidates = generate_candidates(m0, tokenizer, prompt_ids, 2, config, show_progress=False)
    assert m0.training and seen and not any(seen)
    seen.clear()
    scores = score_candidates(m0, prompt_ids, candidates, pad_token_id(tokenizer), 128, show_progress=False)
    assert m0.training and seen and not any(seen)
    assert scores.shape == (2, 2)


def _spy_logits_processors(model, monkeypatch) -> list:
    """Record (effective generation config, logits processor classes) of every generate call on ``model``."""
    calls: list = []
    original = model._get_logits_processor

    def spy(generation_config, *args, **kwargs):
        processors = original(generation_config, *args, **kwargs)
        calls.append((copy.deepcopy(generation_config), [type(p).__name__ for p in processors]))
        return processors

    monkeypatch.setattr(model, "_get_logits_processor", spy)
    return calls


def _model_with_own_generation_settings(tokenizer):
    model = tiny_llama(tokenizer)
    model.generation_config.update(min_p=0.5, top_k=3, repetition_penalty=1.7, no_repeat_ngram_size=2)
    model.generation_config.suppress_tokens = [5]
    return model


@pytest.mark.parametrize("use_lora", [False, True])
def test_only_the_cream_config_decides_how_candidates_are_sampled(tmp_path, tokenizer, prompts, monkeypatch, use_lora):
    model = _model_with_own_generation_settings(tokenizer)
    inner = model
    if use_lora:
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    calls = _spy_logits_processors(inner, monkeypatch)
    args = cream_args(tmp_path, temperature=0.7, top_p=0.9)
    config = sampling_generation_config(args, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:2])

    generate_candidates(model, tokenizer, prompt_ids, 2, config, show_progress=False)
    (effective, processors), *_ = calls
    assert (effective.min_p, effective.top_k, effective.repetition_penalty) == (None, 0, 1.0)
    assert (effective.no_repeat_ngram_size, effective.suppress_tokens) == (0, None)
    assert (effective.temperature, effective.top_p, effective.max_new_tokens) == (0.7, 0.9, 8)
    assert sorted(processors) == ["TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert inner.generation_config.min_p == 0.5 and inner.generation_config.suppress_tokens == [5]  # put back

    # Control: a plain `generate` with the same config lets the model's settings in (the bug this guards against).
    ids, mask = pad_pairs(prompt_ids, [[]] * 2, tokenizer.pad_token_id)[:2]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    leaked, leaked_processors = calls[-1]
    assert (leaked.min_p, leaked.no_repeat_ngram_size, leaked.suppress_tokens) == (0.5, 2, [5])
    assert "MinPLogitsWarper" in leaked_processors


def test_generation_kwargs_and_the_config_fields_reach_the_sampler(tmp_path, tokenizer, prompts, monkeypatch):
    model = _model_with_own_generation_settings(tokenizer)
    calls = _spy_logits_processors(model, monkeypatch)
    args = cream_args(
        tmp_path, top_k=4, min_p=0.05, repetition_penalty=1.3, generation_kwargs={"no_repeat_ngram_size": 3}
    )
    config = sampling_generation_config(args, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert config.eos_token_id == [tokenizer.eos_token_id]
    generate_candidates(model, tokenizer, tokenize_prompts(tokenizer, prompts["prompt"][:1]), 2, config)
    effective, processors = calls[0]
    assert (effective.top_k, effective.min_p, effective.repetition_penalty) == (4, 0.05, 1.3)
    assert effective.no_repeat_ngram_size == 3 and effective.suppress_tokens is None
    assert {"TopKLogitsWarper", "MinPLogitsWarper", "RepetitionPenaltyLogitsProcessor"} <= set(processors)
