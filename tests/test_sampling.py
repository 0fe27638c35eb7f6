"""Sampling and scoring run the model in eval mode and give it back in the mode it came in."""

import copy

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed, tiny_llama
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from trl_cream import CreamTrainer
from trl_cream.modeling.paged import PAGED_CPU_CACHE_BYTES, paged_batching_config
from trl_cream.modeling.sampling import (
    GENERATION_BACKENDS,
    SamplingSettings,
    generate_candidates,
    pad_token_id,
    sampling_generation_config,
    tokenize_prompts,
)
from trl_cream.modeling.scoring import pad_pairs, score_candidates


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
    config = sampling_generation_config(
        SamplingSettings.from_args(args), [tokenizer.eos_token_id], tokenizer.pad_token_id
    )
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
    config = sampling_generation_config(
        SamplingSettings.from_args(args), tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    assert config.eos_token_id == [tokenizer.eos_token_id]
    generate_candidates(model, tokenizer, tokenize_prompts(tokenizer, prompts["prompt"][:1]), 2, config)
    effective, processors = calls[0]
    assert (effective.top_k, effective.min_p, effective.repetition_penalty) == (4, 0.05, 1.3)
    assert effective.no_repeat_ngram_size == 3 and effective.suppress_tokens is None
    assert {"TopKLogitsWarper", "MinPLogitsWarper", "RepetitionPenaltyLogitsProcessor"} <= set(processors)


def _greedy(tokenizer, max_new_tokens: int = 6, eos: list[int] | None = None) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or [tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )


def _lora_policy(model):
    """A PEFT model whose adapter is far from the identity, so that it changes what is generated."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return peft_model


@pytest.mark.parametrize("use_lora", [False, True])
def test_paged_and_generate_backends_agree_on_greedy_decoding(m0, tokenizer, prompts, use_lora):
    model = _lora_policy(m0) if use_lora else m0
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:3])
    config = _greedy(tokenizer)
    common = dict(show_progress=False, batch_size=2)
    padded = generate_candidates(model, tokenizer, prompt_ids, 2, config, backend="generate", **common)
    paged = generate_candidates(model, tokenizer, prompt_ids, 2, config, backend="paged", **common)
    assert paged == padded
    assert [len(c) for c in paged] == [2, 2, 2] and all(len(seq) == 6 for c in paged for seq in c)
    if use_lora:  # the adapter was active in both backends: the base model alone decodes something else
        with model.disable_adapter():
            base = generate_candidates(model, tokenizer, prompt_ids, 2, config, backend="paged", **common)
        assert base != paged


def test_paged_backend_cuts_each_candidate_at_its_first_stop_token(m0, tokenizer, prompts):
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:3])
    free = generate_candidates(m0, tokenizer, prompt_ids, 1, _greedy(tokenizer, 8), show_progress=False)
    stop = free[0][0][2]  # a token the first prompt's greedy answer emits third: declare it a stop token
    config = _greedy(tokenizer, 8, eos=[tokenizer.eos_token_id, stop])
    paged = generate_candidates(m0, tokenizer, prompt_ids, 2, config, backend="paged", show_progress=False)
    padded = generate_candidates(m0, tokenizer, prompt_ids, 2, config, backend="generate", show_progress=False)
    assert paged == padded
    for cands, (reference,) in zip(paged, free, strict=True):
        cut = reference.index(stop) + 1 if stop in reference else len(reference)
        assert cands == [reference[:cut]] * 2  # ends at the first stop token, nothing after it


def test_paged_backend_samples_n_candidates_per_prompt_reproducibly(m0, tokenizer, prompts, tmp_path):
    args = cream_args(tmp_path, generation_backend="paged", max_new_tokens=5)
    config = sampling_generation_config(
        SamplingSettings.from_args(args), [tokenizer.eos_token_id], tokenizer.pad_token_id
    )
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:4])

    def sample(seed: int) -> list:
        torch.manual_seed(seed)  # the engine's own sampler is seeded from torch's global generator
        return generate_candidates(m0, tokenizer, prompt_ids, 3, config, backend="paged", show_progress=False)

    candidates = sample(0)
    assert len(candidates) == 4 and all(len(c) == 3 for c in candidates)
    assert all(1 <= len(seq) <= 5 and all(isinstance(t, int) for t in seq) for c in candidates for seq in c)
    assert len({tuple(seq) for c in candidates for seq in c}) > 4  # sampled, not N copies of one answer
    assert sample(0) == candidates and sample(1) != candidates
    with pytest.raises(ValueError, match="backend='vllm' is unknown"):
        generate_candidates(m0, tokenizer, prompt_ids, 2, config, backend="vllm")


def test_paged_cache_is_sized_to_the_workload_on_cpu(m0):
    # transformers alone would size it to ~90 % of the machine's RAM on CPU (and take ~30 s to zero-fill it).
    few = paged_batching_config(m0, [[1] * 10] * 6, max_new_tokens=20, seed=7)
    assert (few.num_blocks, few.seed, few.max_batch_tokens) == (6, 7, 60)  # one 256-token page per sequence
    # 2 layers x (K, V) x 2 kv heads x head dim 8 x float32 x 256 tokens = 32 KiB a block: 1 GiB holds 32768 blocks.
    many = paged_batching_config(m0, [[1] * 700] * 20_000, max_new_tokens=768, seed=0)
    assert (many.num_blocks, many.max_batch_tokens) == (PAGED_CPU_CACHE_BYTES // (2 * 2 * 2 * 8 * 4 * 256), 1024)
    assert many.num_blocks < 20_000 * 6  # capped: the workload alone would need 6 pages per sequence


def test_trainer_round_samples_through_the_paged_backend(tmp_path, m0, tokenizer, prompts, monkeypatch):
    calls: list[int] = []
    original = m0.generate_batch

    def spy(inputs, **kwargs):
        calls.append(len(inputs))
        return original(inputs=inputs, **kwargs)

    monkeypatch.setattr(m0, "generate_batch", spy)
    monkeypatch.setattr(m0, "generate", lambda *a, **k: pytest.fail("the 'generate' backend was used"))
    args = cream_args(tmp_path, generation_backend="paged", num_iterations=1, max_new_tokens=4)
    CreamTrainer(
        model=m0, ref_model=perturbed(m0), args=args, train_dataset=prompts, processing_class=tokenizer
    ).train()
    assert calls == [len(QUESTIONS) * args.num_generations]  # one call, every prompt x N at once
    candidates = load_from_disk(str(tmp_path / "rounds" / "round_1" / "candidates"))
    assert len(candidates) == len(QUESTIONS) * args.num_generations


def test_a_new_backend_is_one_function_and_one_table_entry(tmp_path, m0, tokenizer, prompts, monkeypatch):
    """The trainer's `generate_candidates` hook reaches the backend named by `generation_backend` in one hop, with
    the run's `SamplingSettings`; the rows it returns are cut at the stop token and grouped per prompt."""
    seen: list[dict] = []
    eos = tokenizer.eos_token_id

    def echo(model, tok, prompt_ids, num_generations, generation_config, batch_size, show_progress, desc, logps_out):
        seen.append(
            dict(
                n=num_generations, config=generation_config, batch_size=batch_size, desc=desc, training=model.training
            )
        )
        if logps_out is not None:
            logps_out.extend([[-1.0 * k for k in range(num_generations)] for _ in prompt_ids])
        return [[len(p), 100 + k, eos, 7, 7] for p in prompt_ids for k in range(num_generations)]

    monkeypatch.setitem(GENERATION_BACKENDS, "generate", echo)  # as a vLLM backend would sit beside it
    args = cream_args(tmp_path, num_generations=3, generation_batch_size=5, temperature=0.6, top_p=0.9, top_k=4)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"][:2])
    sink: list[list[float]] = []
    candidates = trainer.generate_candidates(prompt_ids, desc="round 1: sampling", logps_out=sink)

    assert candidates == [[[len(p), 100 + k, eos] for k in range(3)] for p in prompt_ids]  # cut after eos, per prompt
    assert sink == [[0.0, -1.0, -2.0]] * 2
    (call,) = seen
    assert (call["n"], call["batch_size"], call["desc"]) == (3, 5, "round 1: sampling")
    assert (call["config"].temperature, call["config"].top_k, call["config"].max_new_tokens) == (0.6, 4, 8)
    assert call["config"].use_cache and not call["training"]  # the table entry runs in eval mode, cache on
    assert SamplingSettings.from_args(args) == SamplingSettings(
        num_generations=3, temperature=0.6, top_p=0.9, top_k=4, min_p=None, repetition_penalty=1.0,
        max_new_tokens=8, generation_kwargs=None, batch_size=5, backend="generate",
    )  # fmt: skip
