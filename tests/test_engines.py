"""DeepSpeed ZeRO-2/3 and FSDP2 really run CREAM on 2 CPU processes, and NF4 QLoRA really runs the recipe.

Each engine gets one `accelerate launch` (start-up dominates a tiny run) with the project's own accelerate config
changed only to fit 2 CPU processes (`use_cpu: true`, `num_processes: 2`, `mixed_precision: 'no'`), running a plan
(tests/engine_plan.py) of:

- `examples/cream_llama3.py`, unchanged, with tiny overrides (a tiny local Llama and datasets; SFT + 2 rounds);
- the 2-round run of tests/dist_worker.py with injected candidates, compared with the same run under DDP.

Every launch records what its trainers ran on (tests/engine_launch.py): the accelerate engine flags, the ZeRO stage,
the DeepSpeed engines built and each rank's share of the weights or of the optimizer state, so that a silent
fallback to DDP fails the test. FSDP on CPU needs the launcher's shim (accelerate turns FSDP on CPU into DDP);
DeepSpeed needs `use_cpu` in both the accelerate config and the training arguments.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUESTIONS, RECIPE_TINY_OVERRIDES, tiny_llama, tiny_tokenizer
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="the engine tests need `pip install -e .[test]` (deepspeed)")
pytest.importorskip("bitsandbytes", reason="the QLoRA tests need `pip install -e .[test]` (bitsandbytes)")

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "examples" / "cream_llama3.py"
LAUNCHER = Path(__file__).parent / "engine_launch.py"
PLAN = Path(__file__).parent / "engine_plan.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Tiny models (hidden 32; hidden 64 for NF4), the SFT and prompt datasets, and the 2-CPU accelerate configs."""
    root = tmp_path_factory.mktemp("engine_assets")
    tokenizer = tiny_tokenizer()
    for name, hidden in (("model", 32), ("model64", 64)):
        tiny_llama(tokenizer, hidden_size=hidden).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    answers = ["Seven.", "A cat.", "From clouds.", "Water and light.", "30.", "Hello!", "42.", "Maths."]
    messages = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(QUESTIONS, answers)
    ]
    Dataset.from_dict({"messages": messages}).save_to_disk(str(root / "sft"))
    Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]}).save_to_disk(
        str(root / "prompts")
    )
    for name in ("deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_gpu"):
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        # DeepSpeed and FSDP need use_cpu here; a MULTI_GPU config with use_cpu would launch one process (DDP on CPU
        # takes use_cpu from the training arguments only).
        config.update(use_cpu=name != "multi_gpu", num_processes=2, mixed_precision="no")
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return root


def recipe_step(assets: Path, out: Path, model: str = "model", **overrides) -> dict:
    flags = {
        "model_name_or_path": assets / model,
        "sft_data_path": assets / "sft",
        "prompts_data_path": assets / "prompts",
        "output_dir": out,
        **RECIPE_TINY_OVERRIDES,
        **overrides,
    }
    return {"kind": "script", "path": str(RECIPE), "argv": [f"--{k}={v}" for k, v in flags.items()], "out": str(out)}


def launch(config: Path | None, plan: list[dict], root: Path) -> None:
    """One launch running every step of ``plan``: ``accelerate launch`` with ``config``, or 1 plain process."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable]
    if config is not None:
        command += ["-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--main_process_port", str(_free_port())]
    command += [str(LAUNCHER), str(PLAN), str(root / "plan.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def reports(out: Path) -> list[dict]:
    found = sorted((out / "engine").glob("rank*.json"))
    return [json.loads(p.read_text()) for p in found]


def injected_step(out: Path) -> dict:
    return {"kind": "injected", "out": str(out), "mode": "full_loaded", "batch": 2}


@pytest.fixture(scope="module")
def zero2(assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero2")
    plan = [injected_step(root / "injected"), recipe_step(assets, root / "lora", load_in_4bit="false")]
    plan.append(recipe_step(assets, root / "full", load_in_4bit="false", use_peft="false"))
    launch(assets / "deepspeed_zero2.yaml", plan, root)
    return root


def injected_and_full(assets: Path, root: Path, config: str) -> Path:
    """One launch under ``config``: the injected-candidates run and the recipe with full fine-tuning."""
    plan = [injected_step(root / "injected")]
    plan.append(recipe_step(assets, root / "full", load_in_4bit="false", use_peft="false"))
    launch(assets / config, plan, root)
    return root


@pytest.fixture(scope="module")
def zero3(assets, tmp_path_factory) -> Path:
    return injected_and_full(assets, tmp_path_factory.mktemp("zero3"), "deepspeed_zero3.yaml")


@pytest.fixture(scope="module")
def fsdp2(assets, tmp_path_factory) -> Path:
    return injected_and_full(assets, tmp_path_factory.mktemp("fsdp2"), "fsdp.yaml")


@pytest.fixture(scope="module")
def ddp(assets, tmp_path_factory) -> Path:
    """The DDP reference for the injected run, and the NF4 QLoRA recipe (its default `--load_in_4bit true`) on 2
    DDP processes."""
    root = tmp_path_factory.mktemp("ddp")
    plan = [injected_step(root / "injected"), recipe_step(assets, root / "qlora", model="model64")]
    launch(assets / "multi_gpu.yaml", plan, root)
    return root


# ------------------------------------------------------------------------------------------ what ran
def assert_deepspeed(out: Path, stage: int, rounds: int = 2, sft: bool = True) -> list[dict]:
    """Both ranks ran DeepSpeed at ``stage``; one fresh training engine per round (and the SFT stage), each holding
    half of the trainable parameters' fp32 optimizer partition on each of the 2 ranks."""
    found = reports(out)
    assert len(found) == 2
    for report in found:
        assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["num_processes"] == 2
        assert report["is_deepspeed_enabled"] and not report["is_fsdp_enabled"]
        assert report["zero_stage"] == stage
        training = [e for e in report["deepspeed_engines"] if e["trains"]]
        assert len(training) == rounds + sft  # a fresh engine every round (the stale one was the bug)
        for engine in training:
            assert engine["zero_stage"] == stage
            half = engine["trainable_numel"] / 2
            assert half <= engine["fp32_partition_numel"] < half + 64  # sharded optimizer state (+ alignment)
    return found


def assert_iterations_load(out: Path, lora: bool, base: Path | None = None) -> None:
    """M1..M3 are consolidated from_pretrained folders (full weights of the right shapes) and the rounds moved them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = []
    for k in (1, 2, 3):
        if lora:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / f"M{k}")
        else:
            model = AutoModelForCausalLM.from_pretrained(out / f"M{k}")
            reference = AutoModelForCausalLM.from_pretrained(base)
            shapes = {n: p.shape for n, p in reference.named_parameters()}
            assert {n: p.shape for n, p in model.named_parameters()} == shapes  # whole tensors, not local shards
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    for t in (1, 2):
        metrics = json.loads((out / "rounds" / f"round_{t}" / "metrics.json").read_text())
        assert metrics["num_prompts"] == 4 and metrics["num_candidates"] == 20


def test_zero2_lora_recipe_builds_a_fresh_engine_every_round(zero2, assets):
    assert_deepspeed(zero2 / "lora", stage=2)
    assert_iterations_load(zero2 / "lora", lora=True, base=assets / "model")


def test_zero2_full_recipe_saves_m1_before_any_engine(zero2, assets):
    assert_deepspeed(zero2 / "full", stage=2)
    assert_iterations_load(zero2 / "full", lora=False, base=assets / "model")


def test_zero3_full_recipe_with_weights_partitioned_at_load(zero3, assets):
    found = assert_deepspeed(zero3 / "full", stage=3)
    for report in found:  # the policy stays partitioned: each rank holds about half of it
        assert report["local_param_numel"] <= report["full_param_numel"] / 2 + 256
        assert report["lockstep"]
        frozen = [e for e in report["deepspeed_engines"] if not e["trains"]]
        assert len(frozen) >= 2 and all(e["zero_stage"] == 3 for e in frozen)  # π_0, then π_{t-1}: sharded
    assert_iterations_load(zero3 / "full", lora=False, base=assets / "model")


def test_fsdp2_full_recipe(fsdp2, assets):
    found = reports(fsdp2 / "full")
    assert len(found) == 2
    for report in found:
        assert report["distributed_type"] == "DistributedType.FSDP" and report["num_processes"] == 2
        assert report["is_fsdp_enabled"] and not report["is_deepspeed_enabled"] and report["fsdp_version"] == 2
        assert report["local_param_numel"] <= report["full_param_numel"] / 2 + 256  # fully_shard: half a rank
    assert_iterations_load(fsdp2 / "full", lora=False, base=assets / "model")


# ------------------------------------------------------------------------------------------ equivalence with DDP
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_matches_ddp_on_injected_candidates(engine, request, ddp):
    run, reference = request.getfixturevalue(engine) / "injected", ddp / "injected"
    ran = reports(run)
    assert all(r["is_deepspeed_enabled"] or r["is_fsdp_enabled"] for r in ran) and len(ran) == 2
    assert all(not r["is_deepspeed_enabled"] and not r["is_fsdp_enabled"] for r in reports(reference))
    for t in (1, 2):
        a, b = (json.loads((d / "rounds" / f"round_{t}" / "metrics.json").read_text()) for d in (reference, run))
        for key in ("consistency", "kendall_tau_mean", "spearman_mean", "num_pairs", "reward_margin_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        pa, pb = (load_from_disk(str(d / "rounds" / f"round_{t}" / "pairs")) for d in (reference, run))
        for column in ("prompt_index", "chosen_input_ids", "rejected_input_ids", "consistency"):
            assert pa[column] == pb[column], column
        assert pb["ref_chosen_logps"] == pytest.approx(pa["ref_chosen_logps"], abs=1e-5)
    for d in (reference, run):  # M1 = a second load of π_0 is refused, also when both are partitioned (ZeRO-3)
        assert json.loads((d / "identical_refused.json").read_text()) == {"refused": True}
    final_ddp, final = (load_file(str(d / "M3" / "model.safetensors")) for d in (reference, run))
    assert final.keys() == final_ddp.keys()
    for key in final:
        torch.testing.assert_close(final[key], final_ddp[key], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ QLoRA
def assert_qlora(out: Path, assets: Path, processes: int) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    found = reports(out)
    assert len(found) == processes
    for report in found:
        assert report["num_linear4bit"] == 2 * 7  # every linear layer of the 2 blocks is NF4 (lm_head is not)
        assert report["quant_type"] == "nf4"
        assert report["trainable"] and all("lora_" in n for n in report["trainable"])  # only adapters train
        assert report["ref_model_is_none"]  # π_0 = the base with adapters off: no second model
        assert set(report["adapters"]) == {"default", "cream_previous"}  # π_{t-1}: an adapter on the same base
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(assets / "model64", quantization_config=quantized, device_map="cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = []
    for k in (1, 2, 3):
        model = PeftModel.from_pretrained(base, out / f"M{k}", adapter_name=f"m{k}")
        model.set_adapter(f"m{k}")
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
        base = model.get_base_model()
    assert not torch.allclose(logits[0], logits[2])  # the rounds moved the adapter
    for t in (1, 2):
        metrics = json.loads((out / "rounds" / f"round_{t}" / "metrics.json").read_text())
        assert metrics["num_candidates"] == 20


def test_qlora_recipe_under_ddp(ddp, assets):
    assert_qlora(ddp / "qlora", assets, processes=2)


def test_qlora_recipe_in_one_process(assets, tmp_path):
    launch(None, [recipe_step(assets, tmp_path / "qlora", model="model64")], tmp_path)
    assert_qlora(tmp_path / "qlora", assets, processes=1)
