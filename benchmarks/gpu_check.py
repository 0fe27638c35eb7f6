"""One prepared GPU check (≤ 8 min on one GPU, no network): what CPU CI cannot measure.

    python benchmarks/gpu_check.py                 # on one GPU: all parts, full size
    python benchmarks/gpu_check.py --cpu-smoke     # the CPU-runnable parts at tiny size (tests/test_benchmarks.py)

Parts (each recorded, with its error if it fails, so one failure does not hide the others):

1. ``qlora_round``: Llama-3-8B's architecture (config below, random weights), NF4 base + LoRA r=16 on every linear
   layer, one CREAM round of 32 prompts × N=5 × 256 new tokens; peak GPU memory of each phase (sample, score,
   train, save). Goal: ≤ 16 GiB, so that a round fits a 24 GB card.
2. ``sampling``: ``generate`` vs ``generate_batch`` (paged) vs vLLM (when installed) sequences/s, median of 3, on
   SmolLM2-135M's architecture (bf16); generate vs paged on the 8B QLoRA model.
3. ``zero3_tiny``: examples/cream_llama3.py under DeepSpeed ZeRO-3 on 1 GPU, tiny model, SFT + 2 rounds.
4. ``bf16_demo``: a 2-round bf16 run at the demo's size (SmolLM2-135M architecture, N=4, 48 new tokens).
5. ``qlora_round_vllm``: part 1's round with ``generation_backend="vllm"`` (when vLLM is installed): the bf16 base
   is saved once, loaded NF4 for training and bitsandbytes-quantized by vLLM, which samples with a `LoRARequest`
   on ``M1``; GPU memory in use (``mem_get_info``, which sees vLLM's pool too) after each phase, with sleep mode on.

Writes ``--out`` (JSON) and appends a dated section to benchmarks/RESULTS.md (``--no-results`` to skip).
The tokenizer is the 384-token test tokenizer (tests/fixtures): prompt ids are small; sampled ids span the model's
vocabulary, which nothing decodes (``save_round_artifacts=False``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_tokenizer"
GIB = 2**30

LLAMA3_8B = dict(  # meta-llama/Meta-Llama-3-8B config.json
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048,
)  # fmt: skip
# The round: prompts × n × new_tokens. Throughput: sample_prompts × n × sample_tokens per timed run (median of
# `repeats`, after one warm-up), sized so that the whole check stays under 8 minutes on one GPU.
FULL = dict(prompts=32, n=5, new_tokens=256, sample_prompts=16, sample_tokens=128, repeats=3, demo_prompts=40,
            demo_n=4, demo_tokens=48)  # fmt: skip
SMOKE = dict(prompts=4, n=2, new_tokens=6, sample_prompts=4, sample_tokens=6, repeats=1, demo_prompts=4, demo_n=2,
             demo_tokens=6)  # fmt: skip


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def synced(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 3) if device == "cuda" else None


def quantized_llama(arch: dict[str, Any], device: str, compute_dtype: torch.dtype) -> nn.Module:
    """A Llama with random weights whose linear layers (not lm_head) are bitsandbytes NF4, built one layer at a time
    (never the whole model in 16-bit): the structure ``from_pretrained(..., load_in_4bit=True)`` gives."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**arch, dtype=compute_dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device).manual_seed(0)  # random weights drawn on the GPU: seconds, not minutes
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not model.lm_head:
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                    quant_type="nf4", device="meta",
                )  # fmt: skip
                shape = (child.out_features, child.in_features)
                weight = torch.randn(shape, generator=generator, device=device, dtype=compute_dtype) * 0.02
                layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, layer.to(device))  # quantized on the move
    for name, param in list(model.named_parameters()):  # embeddings, norms, lm_head: still on the meta device
        if param.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            data = torch.ones(param.shape, device=device) if "norm" in leaf or "norm" in owner_name else None
            if data is None:
                data = 0.02 * torch.randn(param.shape, generator=generator, device=device)
            setattr(model.get_submodule(owner_name), leaf, nn.Parameter(data.to(device, compute_dtype), False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.is_loaded_in_4bit = True
    return model.eval()


def nf4_layers(model: nn.Module) -> dict[str, Any]:
    """How many bitsandbytes 4-bit layers the model has, and whether every one holds NF4-quantized weights."""
    layers = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    quantized = [getattr(m.weight, "bnb_quantized", False) and m.weight.quant_type == "nf4" for m in layers]
    return {"num_linear4bit": len(layers), "all_nf4_quantized": bool(layers) and all(quantized)}


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """LoRA r=``rank`` on every linear layer, with small random ``lora_B`` so that M1 ≠ π_0 (as after SFT)."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(1e-3 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return peft


def qlora_round(size: dict[str, int], arch: dict[str, Any], device: str, out: Path) -> dict[str, Any]:
    """One CREAM round on the NF4 + LoRA model, with the peak GPU memory of each phase."""
    from datasets import Dataset

    from trl_cream import CreamConfig, CreamTrainer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = with_lora(quantized_llama(arch, device, dtype), rank=16)
    result: dict[str, Any] = {"model_loaded_peak_gib": peak_gib(device), "phases": {}}

    class Measured(CreamTrainer):
        def _measure(self, phase: str, fn: Callable[[], Any]) -> Any:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            value = fn()
            synced(device)
            result["phases"][phase] = {"s": round(time.perf_counter() - start, 2), "peak_gib": peak_gib(device)}
            return value

        def sample_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("sample", lambda: super(Measured, self).sample_phase(*a, **k))

        def score_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("score", lambda: super(Measured, self).score_phase(*a, **k))

        def train_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("train", lambda: super(Measured, self).train_phase(*a, **k))

        def save_iteration(self, index: int) -> None:
            self._measure(f"save_M{index}", lambda: super(Measured, self).save_iteration(index))

    prompts = [f"Question {i}: what is {i} plus {2 * i}? Explain briefly." for i in range(size["prompts"])]
    args = CreamConfig(
        output_dir=str(out / "qlora_round"), num_iterations=1, num_generations=size["n"],
        max_new_tokens=size["new_tokens"], max_length=size["new_tokens"] + 64, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=2e-5, warmup_steps=0, bf16=device == "cuda",
        use_cpu=device == "cpu", gradient_checkpointing=device == "cuda", generation_batch_size=32,
        scoring_batch_size=16, save_round_artifacts=False, report_to="none", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = Measured(
        model=model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer()
    )
    start = time.perf_counter()
    metrics = trainer.train().metrics["rounds"][0]
    result.update(
        round_s=round(time.perf_counter() - start, 2),
        num_pairs=metrics["num_pairs"],
        consistency=metrics["consistency"],
        **nf4_layers(model),
    )
    peaks = [p["peak_gib"] for p in result["phases"].values() if p["peak_gib"] is not None]
    result["max_phase_peak_gib"] = max(peaks) if peaks else None
    result["fits_16_gib"] = None if not peaks else max(peaks) <= 16
    trainer.accelerator.free_memory()
    return result


def vllm_rate(model: nn.Module, prompt_ids: list[list[int]], size: dict[str, int], device: str) -> float:
    """Sequences/s of a vLLM engine built from ``model`` (saved to a temporary folder; start-up not timed), greedy."""
    from types import SimpleNamespace

    from trl_cream.modeling.vllm_backend import EngineSettings, VLLMSampler

    folder = tempfile.mkdtemp(prefix="gpu_check_vllm_")
    model.save_pretrained(folder)
    dtype = next(model.parameters()).dtype
    sampler = VLLMSampler(
        EngineSettings(
            folder, max_model_len=64 + size["sample_tokens"], seed=0, dtype=dtype, gpu_memory_utilization=0.3
        )
    )
    settings = SimpleNamespace(
        num_generations=size["n"], temperature=1.0, top_p=1.0, top_k=1, min_p=None, repetition_penalty=1.0,
        max_new_tokens=size["sample_tokens"], generation_kwargs=None,
    )  # fmt: skip
    try:
        sampler.generate(prompt_ids, settings, [1], 1)  # warm-up
        times = []
        for _ in range(size["repeats"]):
            synced(device)
            start = time.perf_counter()
            sampler.generate(prompt_ids, settings, [1], 1)
            synced(device)
            times.append(time.perf_counter() - start)
    finally:
        sampler.close()
    return round(len(prompt_ids) * size["n"] / statistics.median(times), 2)


def sampling_rates(
    model: nn.Module, vocab: int, size: dict[str, int], device: str, with_vllm: bool = False
) -> dict[str, Any]:
    """Sequences/s of the generation backends (greedy, so all do the same work), median of ``repeats``; vLLM too
    with ``with_vllm`` when it is installed."""
    from transformers import GenerationConfig

    from trl_cream.modeling.sampling import GENERATION_BACKENDS, generate_candidates

    generator = torch.Generator().manual_seed(0)
    prompt_ids = [
        torch.randint(2, vocab, (16 + i % 16,), generator=generator).tolist() for i in range(size["sample_prompts"])
    ]
    config = GenerationConfig(do_sample=False, max_new_tokens=size["sample_tokens"], eos_token_id=[1], pad_token_id=1)

    class Tok:
        eos_token_id = pad_token_id = 1

    rates: dict[str, Any] = {}
    for backend in GENERATION_BACKENDS:
        try:

            def run(backend: str = backend) -> list:
                return generate_candidates(model, Tok(), prompt_ids, size["n"], config, 8, False, backend=backend)

            run()  # warm-up
            times = []
            for _ in range(size["repeats"]):
                synced(device)
                start = time.perf_counter()
                run()
                synced(device)
                times.append(time.perf_counter() - start)
            rates[backend] = round(size["sample_prompts"] * size["n"] / statistics.median(times), 2)
        except Exception as error:  # noqa: BLE001 - a GPU check records what failed and goes on
            rates[backend] = f"failed: {type(error).__name__}: {error}"[:300]
    if all(isinstance(rates.get(b), float) for b in GENERATION_BACKENDS):
        rates["paged_over_generate"] = round(rates["paged"] / rates["generate"], 3)
    from trl_cream.modeling.vllm_backend import vllm_available

    if with_vllm and vllm_available():
        try:
            rates["vllm"] = vllm_rate(model, prompt_ids, size, device)
            if isinstance(rates.get("generate"), float):
                rates["vllm_over_generate"] = round(rates["vllm"] / rates["generate"], 3)
        except Exception as error:  # noqa: BLE001 - a GPU check records what failed and goes on
            rates["vllm"] = f"failed: {type(error).__name__}: {error}"[:300]
    elif with_vllm:
        rates["vllm"] = "skipped: vLLM is not installed (pip install 'trl-cream[vllm]')"
    return rates


def used_gib(device: str) -> float | None:
    """GPU memory in use by anything (vLLM's memory pool included), GiB."""
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / GIB, 2)


def qlora_round_vllm(size: dict[str, int], arch: dict[str, Any], device: str, out: Path) -> dict[str, Any]:
    """Part 1's round with generation_backend="vllm": NF4 + LoRA training, vLLM sampling with a LoRARequest."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_cream import CreamConfig, CreamTrainer
    from trl_cream.modeling.vllm_backend import vllm_available

    if not vllm_available():
        return {"skipped": "vLLM is not installed (pip install 'trl-cream[vllm]')"}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = out / "qlora_vllm_base"
    plain_llama(arch, "cpu", dtype).save_pretrained(base)  # vLLM loads the base from a folder
    tokenizer().save_pretrained(base)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"}
    )
    result: dict[str, Any] = {"model_loaded_used_gib": used_gib(device), "phases": {}}

    class Measured(CreamTrainer):
        def _measure(self, phase: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            value = fn()
            synced(device)
            result["phases"][phase] = {"s": round(time.perf_counter() - start, 2), "used_gib": used_gib(device)}
            return value

        def sample_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("sample", lambda: super(Measured, self).sample_phase(*a, **k))

        def score_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("score", lambda: super(Measured, self).score_phase(*a, **k))

        def train_phase(self, *a: Any, **k: Any) -> Any:
            return self._measure("train", lambda: super(Measured, self).train_phase(*a, **k))

    prompts = [f"Question {i}: what is {i} plus {2 * i}? Explain briefly." for i in range(size["prompts"])]
    args = CreamConfig(
        output_dir=str(out / "qlora_round_vllm"), num_iterations=1, num_generations=size["n"],
        max_new_tokens=size["new_tokens"], max_length=size["new_tokens"] + 64, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=2e-5, warmup_steps=0, bf16=device == "cuda",
        use_cpu=device == "cpu", gradient_checkpointing=device == "cuda", scoring_batch_size=16,
        save_round_artifacts=False, report_to="none", disable_tqdm=True, logging_steps=1,
        generation_backend="vllm", vllm_gpu_memory_utilization=0.3, vllm_enable_sleep_mode=device == "cuda",
        policy_logps_from_sampling=True,
    )  # fmt: skip
    trainer = Measured(
        model=model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer(),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    start = time.perf_counter()
    metrics = trainer.train().metrics["rounds"][0]
    result.update(
        round_s=round(time.perf_counter() - start, 2),
        num_pairs=metrics["num_pairs"],
        engine=trainer.vllm_engine.timings,
    )
    used = [p["used_gib"] for p in result["phases"].values() if p["used_gib"] is not None]
    result["max_used_gib"] = max(used) if used else None
    trainer.accelerator.free_memory()
    return result


def plain_llama(arch: dict[str, Any], device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**arch)).to(device, dtype).eval()


def zero3_tiny(device: str, out: Path) -> dict[str, Any]:
    """examples/cream_llama3.py under DeepSpeed ZeRO-3 on 1 process: SFT + 2 rounds of a tiny Llama."""
    import yaml
    from datasets import Dataset

    work = out / "zero3_tiny"
    tok = tokenizer()
    plain_llama(TINY | {"vocab_size": len(tok)}, "cpu", torch.float32).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    questions = [f"What is {i} plus {i}?" for i in range(8)]
    sft = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": str(2 * i)}] for i, q in enumerate(questions)
    ]
    Dataset.from_dict({"messages": sft}).save_to_disk(str(work / "sft"))
    Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]}).save_to_disk(str(work / "p"))
    config = yaml.safe_load((ROOT / "examples" / "accelerate_configs" / "deepspeed_zero3.yaml").read_text())
    config.update(num_processes=1, use_cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    (work / "zero3.yaml").write_text(yaml.safe_dump(config))
    flags = dict(
        model_name_or_path=work / "model", sft_data_path=work / "sft", prompts_data_path=work / "p",
        output_dir=work / "out", load_in_4bit="false", use_peft="false", max_new_tokens=16, max_length=128,
        sft_max_length=128, sft_num_train_epochs=1, sft_learning_rate=1e-3, learning_rate=1e-3, warmup_steps=0,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, report_to="none", disable_tqdm="true",
        use_cpu=str(device == "cpu").lower(), bf16=str(device == "cuda").lower(), dtype="float32",
        gradient_checkpointing="false",
    )  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "zero3.yaml")]
    command += [str(ROOT / "examples" / "cream_llama3.py"), *(f"--{k}={v}" for k, v in flags.items())]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = {"s": round(time.perf_counter() - start, 1), "returncode": run.returncode}
    result["iterations_saved"] = sorted(p.name for p in (work / "out").glob("M*") if (p / "config.json").exists())
    if run.returncode:
        result["stderr_tail"] = run.stderr[-1500:]
    return result


def bf16_demo(size: dict[str, int], device: str, out: Path) -> dict[str, Any]:
    """Two CREAM rounds at the demo's size in bf16 (SmolLM2-135M architecture, LoRA, the demo's settings)."""
    from datasets import Dataset

    from trl_cream import CreamConfig, CreamTrainer
    from trl_cream.recipes.demo import DEMO_DEFAULTS

    arch = SMOLLM2_135M if device == "cuda" else TINY
    model = with_lora(plain_llama(arch, device, torch.bfloat16), rank=16)
    prompts = [f"Question {i}: name something {i} people like." for i in range(size["demo_prompts"])]
    settings = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("output_dir", "bf16", "logging_steps")}
    settings.update(num_generations=size["demo_n"], max_new_tokens=size["demo_tokens"], save_round_artifacts=False)
    args = CreamConfig(output_dir=str(out / "bf16_demo"), bf16=True, use_cpu=device == "cpu", disable_tqdm=True,
                       **settings)  # fmt: skip
    trainer = CreamTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer()
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rounds = trainer.train().metrics["rounds"]
    return {
        "s": round(time.perf_counter() - start, 1),
        "peak_gib": peak_gib(device),
        "rounds": [{k: r[k] for k in ("consistency", "num_pairs", "train_loss")} for r in rounds],
    }


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - record the failure, run the other parts
        return {"failed": f"{type(error).__name__}: {error}"[:500], "traceback": traceback.format_exc()[-2000:]}
    finally:
        gc.collect()  # the part's models go before the next part builds its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)


def results_section(report: dict[str, Any]) -> str:
    q, s = report["qlora_round"], report["sampling"]
    lines = [
        f"## {report['date']}, gpu_check.py ({report['mode']}), {report['device_name']}, torch {report['torch']}",
        "",
        "`python benchmarks/gpu_check.py" + (" --cpu-smoke" if report["mode"] == "cpu-smoke" else "") + "`, "
        f"total {report['total_s']} s. Full figures: the JSON beside this file's run (`--out`).",
        "",
        f"- QLoRA round ({report['sizes']['prompts']} prompts × N={report['sizes']['n']} × "
        f"{report['sizes']['new_tokens']} new tokens): "
        + (
            q.get("failed")
            or f"{q['round_s']} s, peak GiB per phase "
            + ", ".join(f"{k} {v['peak_gib']}" for k, v in q["phases"].items())
            + f" (≤ 16 GiB: {q['fits_16_gib']})"
        ),
        f"- sampling sequences/s: {json.dumps(s)}",
        f"- ZeRO-3 tiny 2-round run: {json.dumps(report['zero3_tiny'])[:300]}",
        f"- bf16 demo-size run: {json.dumps(report['bf16_demo'])[:300]}",
        f"- QLoRA round with vLLM: {json.dumps(report.get('qlora_round_vllm'))[:400]}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on CPU: checks the script, no figures.")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: a temporary folder).")
    parser.add_argument("--no-results", action="store_true", help="Do not append to benchmarks/RESULTS.md.")
    parser.add_argument("--skip", nargs="*", default=[], help="Parts to skip (qlora_round sampling zero3_tiny ...).")
    a = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no GPU here: run with --cpu-smoke (tiny sizes) or on a GPU machine.")
    device, size = ("cpu", SMOKE) if smoke else ("cuda", FULL)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    big = TINY if smoke else LLAMA3_8B
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "mode": "cpu-smoke" if smoke else "gpu",
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "torch": torch.__version__,
        "sizes": size,
    }
    start = time.perf_counter()
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "qlora_round": lambda: qlora_round(size, big, device, work),
        "sampling": lambda: {
            "smollm2_135m_bf16": sampling_rates(
                plain_llama(TINY if smoke else SMOLLM2_135M, device, torch.float32 if smoke else torch.bfloat16),
                TINY["vocab_size"] if smoke else SMOLLM2_135M["vocab_size"],
                size,
                device,
                with_vllm=True,
            ),
            "llama3_8b_qlora": sampling_rates(
                with_lora(quantized_llama(big, device, torch.float32 if smoke else torch.bfloat16), 16),
                big["vocab_size"],
                size,
                device,
            ),
        },  # fmt: skip
        "zero3_tiny": lambda: (
            {"skipped": "on CPU, tests/test_engines.py runs ZeRO-3 on 2 processes"}
            if smoke
            else zero3_tiny(device, work)
        ),
        "bf16_demo": lambda: bf16_demo(size, device, work),
        "qlora_round_vllm": lambda: qlora_round_vllm(size, big, device, work),
    }
    for name, part in parts.items():
        print(f"gpu_check: {name}", flush=True)
        report[name] = {"skipped": True} if name in a.skip else guarded(part)
    report["total_s"] = round(time.perf_counter() - start, 1)
    out = a.out or work / "gpu_check.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if not a.no_results:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + results_section(report))
    return report


if __name__ == "__main__":
    main()
