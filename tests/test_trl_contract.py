"""What trl-cream takes from TRL's experimental `OnlineDPOTrainer` (gathered in `trl_cream.trainer.trl_base`).

`trl.experimental` carries no stability guarantee. Each test names one thing the plugin relies on, so that a TRL
release that renames, drops or reshapes it fails here with a message saying what changed, instead of somewhere in a
round.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, cream_args, perturbed, tiny_llama, tiny_tokenizer
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from trl_cream import CreamTrainer
from trl_cream.trainer import trl_base
from trl_cream.trainer.trl_base import (
    PARENT_ATTRIBUTES,
    PARENT_CONFIG_FIELDS,
    PARENT_INIT_PARAMETERS,
    PARENT_METHODS,
    OnlineDPOConfig,
    OnlineDPOTrainer,
)

ROOT = Path(__file__).parents[1]
CHANGED = "TRL's OnlineDPOTrainer changed: update trl_cream/trainer/trl_base.py (and the TRL pin in pyproject.toml)"


def test_the_parent_comes_from_trl_experimental_through_trl_base_alone() -> None:
    assert OnlineDPOTrainer.__module__.startswith("trl.experimental.online_dpo"), OnlineDPOTrainer.__module__
    assert OnlineDPOConfig.__module__.startswith("trl.experimental.online_dpo"), OnlineDPOConfig.__module__
    assert issubclass(trl_base.TrlOnlineDPOBase, OnlineDPOTrainer)
    importers = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "trl_cream").rglob("*.py"))
        if re.search(r"^\s*(from|import)\s+trl\.experimental", path.read_text(), re.M)
    ]
    assert importers == ["trl_cream/trainer/trl_base.py"], importers


@pytest.mark.parametrize(
    "line",
    [
        "from trl.experimental.online_dpo import OnlineDPOConfig",
        "import trl.experimental.online_dpo",
        "from trl import experimental",
    ],
)
def test_ruff_refuses_trl_experimental_outside_trl_base(line: str) -> None:
    """ruff's banned-api rule (TID251, pyproject.toml): the import fails lint anywhere but trl_base.py."""
    source = f"{line}\n"

    def ruff(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename", path, "-"],
            input=source, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip

    elsewhere = ruff("trl_cream/trainer/config.py")
    assert elsewhere.returncode == 1 and "TID251" in elsewhere.stdout, elsewhere.stdout + elsewhere.stderr
    assert "TID251" not in ruff("trl_cream/trainer/trl_base.py").stdout


def test_importing_trl_cream_leaves_the_users_environment_and_warnings_alone() -> None:
    """``import trl_cream`` (and its trainer) neither sets TRL_EXPERIMENTAL_SILENCE for the process nor shows TRL's
    experimental notice; a later import of trl.experimental by the user still warns as TRL intends."""
    code = (
        "import os, warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import trl_cream\n"
        "    from trl_cream import CreamConfig, CreamTrainer\n"
        "    from trl_cream.trainer import trl_base\n"
        "ours = [w for w in seen if type(w.message).__name__ == 'TRLExperimentalWarning']\n"
        "print(len(ours), os.environ.get('TRL_EXPERIMENTAL_SILENCE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRL_EXPERIMENTAL_SILENCE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "None"], done.stdout


def test_constructor_takes_the_arguments_cream_passes() -> None:
    params = inspect.signature(OnlineDPOTrainer.__init__).parameters
    missing = [name for name in PARENT_INIT_PARAMETERS if name not in params]
    assert not missing, f"{CHANGED}: OnlineDPOTrainer.__init__ no longer takes {missing}."


@pytest.mark.parametrize("name", sorted(PARENT_METHODS))
def test_methods_cream_overrides_or_calls_keep_their_signature(name: str) -> None:
    method = getattr(OnlineDPOTrainer, name, None)
    assert method is not None, f"{CHANGED}: OnlineDPOTrainer.{name} is gone."
    params = list(inspect.signature(method).parameters)[1:]  # without self
    expected = list(PARENT_METHODS[name])
    assert params[: len(expected)] == expected, f"{CHANGED}: OnlineDPOTrainer.{name}{params} (expected {expected})."


def test_beta_is_a_property_of_the_parent() -> None:
    beta = inspect.getattr_static(OnlineDPOTrainer, "beta", None)
    assert isinstance(beta, property), f"{CHANGED}: OnlineDPOTrainer.beta is {type(beta).__name__}, not a property."


def test_config_fields_cream_reads_exist() -> None:
    fields = {f.name for f in dataclasses.fields(OnlineDPOConfig)}
    missing = [name for name in PARENT_CONFIG_FIELDS if name not in fields]
    assert not missing, f"{CHANGED}: OnlineDPOConfig has no {missing}."


def test_every_field_of_the_parent_config_is_either_read_or_refused() -> None:
    """A field TRL adds to OnlineDPOConfig must be classified: used by CREAM, or refused when set (CreamConfig)."""
    from transformers import TrainingArguments

    from trl_cream.trainer.config_checks import IGNORED_PARENT_FIELDS, VLLM_PARENT_FIELDS

    own = {f.name for f in dataclasses.fields(OnlineDPOConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    unclassified = own - set(PARENT_CONFIG_FIELDS) - set(IGNORED_PARENT_FIELDS) - set(VLLM_PARENT_FIELDS)
    assert not unclassified, (
        f"{CHANGED}: new OnlineDPOConfig fields {sorted(unclassified)} are neither read nor refused."
    )
    gone = set(IGNORED_PARENT_FIELDS) - own
    assert not gone, f"{CHANGED}: OnlineDPOConfig no longer has {sorted(gone)}; drop them from IGNORED_PARENT_FIELDS."


def test_constructor_sets_the_attributes_cream_reads(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    args = OnlineDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    parent = OnlineDPOTrainer(
        model=perturbed(m0), ref_model=m0, reward_funcs=[], args=args, train_dataset=prompts,
        processing_class=tokenizer,
    )  # fmt: skip
    missing = [name for name in PARENT_ATTRIBUTES if not hasattr(parent, name)]
    assert not missing, f"{CHANGED}: an OnlineDPOTrainer no longer has {missing} after __init__."
    assert parent._tokenizer is tokenizer, f"{CHANGED}: `_tokenizer` is no longer the processing_class."
    assert tokenizer.eos_token_id in list(parent.eos_token_ids), f"{CHANGED}: `eos_token_ids` lacks the eos id."
    assert isinstance(parent.stats, dict), f"{CHANGED}: `stats` is a {type(parent.stats).__name__}, not a dict."
    assert parent.ref_model is not None, f"{CHANGED}: `ref_model` is not kept (full fine-tuning needs π_0)."


def _parent(tmp_path, model, ref_model=None, **kwargs) -> OnlineDPOTrainer:
    tokenizer = tiny_tokenizer()
    args = OnlineDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
    return OnlineDPOTrainer(
        model=model, ref_model=ref_model, reward_funcs=[], args=args, train_dataset=prompts,
        processing_class=tokenizer, **kwargs,
    )  # fmt: skip


def test_the_parent_deep_copies_a_peft_model_as_reference_unless_cream_passes_a_placeholder(tmp_path) -> None:
    """Why `TrlOnlineDPOBase` hands the parent `_AdapterReference`: given a `PeftModel` and no reference, the parent
    makes a frozen deep copy of the whole model (π_0 would then be a second copy of the base, in memory)."""
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(tiny_tokenizer()), lora)
    parent = _parent(tmp_path, model)
    copy = parent.ref_model
    assert copy is not None and copy is not model, f"{CHANGED}: a PeftModel no longer gets a copied reference."
    own = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in own for p in copy.parameters()), f"{CHANGED}: the reference shares weights now."
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    # With the base model + peft_config the parent keeps no reference (π_0 = adapters disabled), as CREAM expects.
    base = _parent(tmp_path, tiny_llama(tiny_tokenizer()), peft_config=lora)
    assert base.ref_model is None, f"{CHANGED}: with peft_config the parent now builds a reference model."
    # CREAM's base: no copy, whatever the parent would do.
    m1 = get_peft_model(tiny_llama(tiny_tokenizer()), lora)
    with torch.no_grad():  # an M1 distinct from π_0, as after SFT
        for name, param in m1.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    ours = CreamTrainer(
        model=m1, args=cream_args(tmp_path / "ours"),
        train_dataset=Dataset.from_dict({"prompt": QUESTIONS}), processing_class=tiny_tokenizer(),
    )  # fmt: skip
    assert ours.ref_model is None


def test_the_parent_places_the_full_reference_as_given_in_eval_mode(tmp_path) -> None:
    """Full fine-tuning: π_0 is the model passed as ``ref_model``, prepared for evaluation (same object off
    DeepSpeed/FSDP: CREAM's scoring moves it to the device only while it scores)."""
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    parent = _parent(tmp_path, perturbed(m0), m0)
    assert parent.ref_model is m0, f"{CHANGED}: the reference is no longer the model passed as ref_model."
    assert not parent.ref_model.training, f"{CHANGED}: the reference is no longer put in eval mode."
    assert next(parent.ref_model.parameters()).device == parent.accelerator.device


def test_the_parent_averages_only_its_stats_dict_into_a_log_and_cream_logs_its_own_metrics(tmp_path) -> None:
    """The parent's `_maybe_log_save_evaluate` averages every list of ``self.stats`` into each training log (its
    fixed keys would divide by zero when empty); CREAM leaves that dict empty and logs its per-step metrics the way
    TRL's `DPOTrainer` does: stored by `record_metrics`, averaged in `log()`, then cleared."""
    parent = _parent(tmp_path, perturbed(tiny_llama(tiny_tokenizer())), tiny_llama(tiny_tokenizer()))
    assert "rewards/margins" in parent.stats and "objective/kl" in parent.stats, f"{CHANGED}: `stats` keys changed."

    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    args = cream_args(tmp_path / "cream", num_iterations=1, logging_steps=1, per_device_train_batch_size=1)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]}),
    )  # fmt: skip
    assert trainer.stats == {}
    recorded: list[dict[str, float]] = []
    original = trainer.record_metrics

    def spy(metrics):
        recorded.append({k: float(v.float().mean()) for k, v in metrics.items()})
        original(metrics)

    trainer.record_metrics = spy
    output = trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == output.metrics["rounds"][0]["train_steps"] == len(recorded) > 0
    for log, metrics in zip(steps, recorded, strict=True):  # one batch per step: the log holds that batch's values
        assert set(metrics) <= set(log), sorted(set(metrics) - set(log))
        for key, value in metrics.items():
            assert log[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        assert not {"objective/kl", "val/contain_eos_token", "objective/entropy"} & set(log)  # the parent's own
    assert not trainer._metrics  # cleared by the last log
