"""Shared fixtures: a tiny random Llama with a 384-token ChatML tokenizer, so every test runs in seconds on CPU."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
QUESTIONS = [
    "What is 3 plus 4?",
    "Name a mammal.",
    "Where does rain come from?",
    "What do plants need?",
    "Which is bigger, 12 or 30?",
    "Say hello.",
    "What is the answer?",
    "Name a school subject.",
]


# The tiny overrides that run examples/cream_llama3.py (SFT + 2 rounds) on the tiny Llama in seconds
# (tests/test_recipe.py, tests/test_engines.py); the paper's lr 1e-6 would leave a tiny random model's adapter
# near identity, and rounds of one step get no warm-up anyway.
RECIPE_TINY_OVERRIDES = {
    "dtype": "float32",
    "use_cpu": "true",
    "bf16": "false",
    "gradient_checkpointing": "false",
    "lora_r": 4,
    "lora_alpha": 8,
    "max_new_tokens": 8,
    "max_length": 128,
    "sft_max_length": 128,
    "sft_num_train_epochs": 1,
    "sft_learning_rate": 1e-2,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "generation_batch_size": 4,
    "scoring_batch_size": 8,
    "report_to": "none",
    "disable_tqdm": "true",
}


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(FIXTURES / "tiny_tokenizer")


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """A 2-layer random Llama; ``hidden_size`` ≥ 64 for bitsandbytes NF4 (32 is below its quantization block)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every weight nudged: a stand-in for M1 = M0 after SFT."""
    generator = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return other


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def lora_m1(m0: torch.nn.Module, lora: dict | None = None, scale: float = 0.5) -> torch.nn.Module:
    """M1 as a LoRA adapter on M0 whose lora_B is non-zero (as after an SFT stage): ``LORA`` unless ``lora`` is
    given, lora_B drawn from N(0, ``scale``²) with seed 3."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(m0, LoraConfig(**(LORA if lora is None else lora)))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture()
def tokenizer() -> PreTrainedTokenizerBase:
    return tiny_tokenizer()


@pytest.fixture()
def m0(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    return tiny_llama(tokenizer)


@pytest.fixture()
def prompts() -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})


def cream_args(output_dir: Path, **overrides):
    from trl_cream import CreamConfig

    kwargs = dict(
        output_dir=str(output_dir),
        num_iterations=2,
        num_generations=3,
        max_new_tokens=8,
        max_length=128,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        warmup_steps=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        generation_batch_size=4,
        scoring_batch_size=8,
    )
    kwargs.update(overrides)
    return CreamConfig(**kwargs)


# ------------------------------------------------------------------------------------ finished runs, shared
# A test that only reads a finished run's results (files, metrics, logs, manifest) takes one of these instead of
# training its own: each is trained once per session. None may be written into: a test that writes (a resume, a
# damaged file, another run in the folder) takes `finished_run`, a copy in its own tmp_path. Each fixture checks at
# the end of the session that no file of its run changed.


def _digests(folder: Path) -> dict[str, str]:
    """``relative path → SHA-256`` of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train_default_run(out: Path, **overrides) -> SimpleNamespace:
    """A full fine-tuning run with `cream_args`' defaults (+ ``overrides``): M1 = `perturbed(m0)`, π_0 = m0 (the
    tiny Llama), the 8 `QUESTIONS` as chat prompts."""
    from trl_cream import CreamTrainer

    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    args = cream_args(out, **overrides)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    output = trainer.train()
    return SimpleNamespace(out=out, args=args, output=output, log_history=list(trainer.state.log_history))


def _unchanged_after_the_session(run: SimpleNamespace) -> Iterator[SimpleNamespace]:
    before = _digests(run.out)
    yield run
    after = _digests(run.out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared finished run {run.out}: {changed[:5]} (copy it first)"


@pytest.fixture(scope="session")
def finished_full_run(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """One finished 2-round full fine-tuning run with `cream_args`' defaults (`_train_default_run`), read-only.
    Attributes: ``out`` (the output_dir), ``args``, ``output`` (what `train()` returned), ``log_history``."""
    yield from _unchanged_after_the_session(_train_default_run(tmp_path_factory.mktemp("finished_full_run") / "run"))


@pytest.fixture(scope="session")
def finished_one_round_run(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """One finished 1-round full fine-tuning run, `cream_args(num_iterations=1)` otherwise as `finished_full_run`,
    read-only (tests that write take `finished_run`). Attributes as `finished_full_run`'s."""
    out = tmp_path_factory.mktemp("finished_one_round_run") / "run"
    yield from _unchanged_after_the_session(_train_default_run(out, num_iterations=1))


@pytest.fixture()
def finished_run(finished_one_round_run, tmp_path) -> Path:
    """A copy of `finished_one_round_run`'s folder at ``tmp_path / "run"``, for a test that writes into it."""
    return Path(shutil.copytree(finished_one_round_run.out, tmp_path / "run"))
