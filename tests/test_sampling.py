"""Sampling and scoring run the model in eval mode and give it back in the mode it came in."""

from transformers import GenerationConfig

from trl_cream.sampling import generate_candidates, pad_token_id, score_candidates, tokenize_prompts


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
