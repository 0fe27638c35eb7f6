"""The README quickstart runs as pasted (issue 25, item 7): its Python block is executed with the model id swapped
for the tiny test model, and must train every round."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import tiny_llama, tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def quickstart_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Quickstart has no ```python block"
    return match.group(1)


def test_quickstart_defines_everything_it_uses():
    code = quickstart_block()
    for name in ("prompts", "seed_sft"):
        assert re.search(rf"^{name} = ", code, re.MULTILINE), f"the quickstart uses {name} without defining it"
    assert code.count(MODEL_ID) == 2


def test_quickstart_runs_as_pasted(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-model"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)  # the block writes to ./out
    code = quickstart_block().replace(MODEL_ID, str(model_dir))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, str(README), "exec"), namespace)
    for k in (1, 2, 3):
        assert (tmp_path / "out" / f"M{k}").is_dir(), f"out/M{k} was not saved"
    metrics = namespace["trainer"].round_metrics
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["train_steps"] >= 1 for m in metrics)
