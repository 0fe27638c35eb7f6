"""The model card of an iteration (`trl_cream.hub.model_card`): front matter, name, sections, lineage, base model and
the links to the tracking runs."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from conftest import cream_args

from trl_cream import CreamTrainer
from trl_cream.hub import model_card
from trl_cream.hub.model_card import CardSettings, build_model_card

ROUND = {"round": 1, "consistency": 0.625, "kendall_tau_mean": 0.25, "kendall_tau_std": 0.5, "num_pairs": 3}


def _card(args, base_model: str, **kwargs) -> str:
    return build_model_card(
        trainer_cls=CreamTrainer, index=2, first_index=1, settings=CardSettings.from_args(args), rounds=[ROUND],
        peft=False, base_model=base_model, **kwargs,
    ).content  # fmt: skip


def test_card_front_matter_name_sections_and_base_model(tmp_path):
    base = tmp_path / "models" / "smollm2-base"
    base.mkdir(parents=True)
    card = _card(cream_args(tmp_path / "out"), str(base))
    front, text = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "licence" not in front and "license: license" not in front  # TRL's template placeholder is dropped
    assert "model_name: smollm2-base-CREAM-M2" in front and "(M2)" not in card
    assert str(tmp_path) not in front and "base_model:" not in front  # a local folder is not a Hub id
    lineage = text[text.index("## Lineage") : text.index("## How to load")]
    assert str(base) not in lineage and "a local model (folder `smollm2-base`" in lineage
    procedure = text[text.index("## Training procedure") : text.index("### Framework versions")]
    assert "This model was trained with CREAM" in procedure and "### CREAM rounds" in procedure
    assert "| 1 | 0.625 | 0.250 ± 0.500 |" in procedure and "### CREAM configuration" in procedure
    assert "\n\n\n" not in procedure  # no empty badge lines

    hub = _card(cream_args(tmp_path / "out", hub_model_id="me/cream-smol"), "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "model_name: cream-smol-M2" in hub and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in hub
    assert "(π_0 = M0): `HuggingFaceTB/SmolLM2-135M-Instruct`" in hub


def test_card_links_the_wandb_and_trackio_runs(tmp_path, monkeypatch):
    url = "https://wandb.ai/me/cream/runs/abc123"
    monkeypatch.setattr(model_card, "is_wandb_available", lambda: True)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=SimpleNamespace(url=url)))
    monkeypatch.setattr(model_card, "get_trackio_space_url", lambda: "https://me-t.hf.space?project=p&runs=r")
    wandb_url, trackio_url = model_card.run_urls()
    assert wandb_url == url and trackio_url.startswith("https://me-t.hf.space")
    card = _card(cream_args(tmp_path), "org/base", wandb_url=wandb_url, trackio_url=trackio_url)
    procedure = card[card.index("## Training procedure") :]
    assert f"]({url})" in procedure and "Visualize in Weights & Biases" in procedure
    assert "Visualize in Trackio" in procedure and "trackio:https://me-t.hf.space" in card
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=None))
    assert model_card.run_urls()[0] is None
    assert "Visualize in" not in _card(cream_args(tmp_path), "org/base")
