"""What trl-cream takes from TRL's experimental `OnlineDPOTrainer` (gathered in `trl_cream.trainer.trl_base`).

`trl.experimental` carries no stability guarantee. Each test names one thing the plugin relies on, so that a TRL
release that renames, drops or reshapes it fails here with a message saying what changed, instead of somewhere in a
round.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from conftest import QUESTIONS, perturbed, tiny_llama, tiny_tokenizer
from datasets import Dataset

from trl_cream.trainer import trl_base
from trl_cream.trainer.trl_base import (
    PARENT_ATTRIBUTES,
    PARENT_CONFIG_FIELDS,
    PARENT_INIT_PARAMETERS,
    PARENT_METHODS,
    OnlineDPOConfig,
    OnlineDPOTrainer,
)

CHANGED = "TRL's OnlineDPOTrainer changed: update trl_cream/trainer/trl_base.py (and the TRL pin in pyproject.toml)"


def test_the_parent_is_importable_from_trl_experimental() -> None:
    import trl.experimental.online_dpo as online_dpo

    assert online_dpo.OnlineDPOTrainer is OnlineDPOTrainer and online_dpo.OnlineDPOConfig is OnlineDPOConfig
    assert issubclass(trl_base.TrlOnlineDPOBase, OnlineDPOTrainer)


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

    from trl_cream.trainer.config import IGNORED_PARENT_FIELDS

    own = {f.name for f in dataclasses.fields(OnlineDPOConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    unclassified = own - set(PARENT_CONFIG_FIELDS) - set(IGNORED_PARENT_FIELDS)
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
