"""The `trl-cream` command: YAML + overrides through TrlParser, `train` end to end, `eval` on real rows."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUESTIONS, perturbed, tiny_llama, tiny_tokenizer

from trl_cream import cli


def test_yaml_config_plus_command_line_overrides(tmp_path):
    config = tmp_path / "cream.yaml"
    config.write_text(
        "model_name_or_path: some/model\ndataset_name: prompts.jsonl\nnum_iterations: 3\nnum_generations: 6\n"
        "consistency_measure: spearman\nlearning_rate: 2.0e-6\nuse_peft: true\nlora_r: 8\noutput_dir: out\n"
    )
    script, args, model_args = cli.train_parser().parse_args_and_config(
        ["--config", str(config), "--num_generations", "4", "--consistency_granularity", "sample"]
    )
    assert script.dataset_name == "prompts.jsonl" and model_args.model_name_or_path == "some/model"
    assert (args.num_iterations, args.num_generations, args.learning_rate) == (3, 4, 2e-6)
    assert (args.consistency_measure, args.consistency_granularity) == ("spearman", "sample")
    assert model_args.use_peft and model_args.lora_r == 8


def test_bad_values_are_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.train_parser().parse_args_and_config(["--consistency_measure", "pearson", "--output_dir", str(tmp_path)])
    # A value CreamConfig refuses, or a missing companion option: a parser error (exit 2), not a traceback.
    for argv, message in (
        (["--num_generations", "1"], "num_generations=1"),
        (["--push_to_hub"], "push_to_hub=True needs hub_model_id"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.train_parser().parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "trl-cream train: error: " + message in err, err
        assert "Traceback" not in err


def test_help_lists_commands_and_fields(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    for command, field in (("train", "--num_generations"), ("eval", "--checkpoints"), ("demo", "--size")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert field in capsys.readouterr().out


def _save_tiny(tmp_path: Path) -> tuple[Path, Path]:
    tok = tiny_tokenizer()
    m0 = tiny_llama(tok)
    m0_dir, m1_dir = tmp_path / "m0", tmp_path / "m1"
    for model, path in ((m0, m0_dir), (perturbed(m0), m1_dir)):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return m0_dir, m1_dir


def test_train_command_runs_rounds_from_files(tmp_path):
    m0_dir, m1_dir = _save_tiny(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    code = cli.main(
        ["train", "--model_name_or_path", str(m1_dir), "--ref_model_name_or_path", str(m0_dir),
         "--dataset_name", str(prompts), "--prompt_column", "question", "--output_dir", str(out),
         "--num_iterations", "2", "--num_generations", "2", "--max_new_tokens", "6", "--max_length", "128",
         "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
         "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--dtype", "float32"]
    )  # fmt: skip
    assert code == 0
    assert all((out / m / "model.safetensors").exists() for m in ("M1", "M2", "M3"))
    metrics = json.loads((out / "rounds" / "round_2" / "metrics.json").read_text())
    assert metrics["num_prompts"] == len(QUESTIONS) // 2


@pytest.mark.slow
def test_eval_command_on_real_rows(tmp_path):
    m0_dir, m1_dir = _save_tiny(tmp_path)
    out = tmp_path / "eval"
    code = cli.main(
        ["eval", "--checkpoints", f"M0={m0_dir}", f"M1={m1_dir}", f"M2={m1_dir}", "--size", "tiny",
         "--tasks", "arc_easy", "gsm8k", "--output_dir", str(out), "--max_new_tokens", "4",
         "--num_generations", "2", "--consistency_prompts", "2", "--batch_size", "8"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"M0", "M1", "M2"}
    for per_task in results["accuracy"].values():
        assert set(per_task) == {"arc_easy", "gsm8k"}
        assert all(0 <= r["accuracy"] <= 1 and r["n"] > 0 for r in per_task.values())
    # M2 and M1 are the same weights: their rankings agree exactly.
    assert results["consistency"]["M2 vs M1"]["kendall_tau"]["mean"] == pytest.approx(1.0)
    assert (out / "results.md").read_text().count("M1") >= 2 and (out / "results.png").stat().st_size > 0


def test_llama3_example_parses_its_recipe():
    script = Path(__file__).parents[1] / "examples" / "cream_llama3.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--num_generations" in result.stdout and "--prepare_only" in result.stdout


def test_package_import_and_cli_help_load_no_torch():
    """`import trl_cream` and `trl-cream --help` must not import torch/transformers/trl (they cost 7-16 s on the
    2-core machine); `from trl_cream import CreamConfig, CreamTrainer` still works, and loads them."""
    code = (
        "import sys\n"
        "import trl_cream\n"
        "from trl_cream.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
    # in this process (torch already loaded): the lazy names resolve to the classes at their real paths
    import trl_cream
    import trl_cream.trainer.trainer as real
    from trl_cream import CreamConfig, CreamTrainer
    from trl_cream.trainer.config import CreamConfig as config_class

    assert real.CreamTrainer is CreamTrainer is trl_cream.CreamTrainer and CreamConfig is config_class
    assert {"CreamConfig", "CreamTrainer"} <= set(dir(trl_cream))


def test_the_cli_package_runs_as_a_module_for_accelerate_launch():
    """`accelerate launch -m trl_cream.cli train ...` (docs/scaling.md) needs the cli package's ``__main__``."""
    result = subprocess.run(
        [sys.executable, "-m", "trl_cream.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: trl-cream {train,eval"), result.stderr


@pytest.mark.parametrize(
    "old_path", ["trl_cream.cream_trainer", "trl_cream.sampling", "trl_cream.checkpointing", "trl_cream.cli_parsing"]
)
def test_the_flat_0_1_module_paths_are_gone(old_path):
    """No import shim: the pre-layout paths fail instead of silently aliasing the moved modules."""
    with pytest.raises(ModuleNotFoundError, match=old_path):
        importlib.import_module(old_path)


def test_train_help_shows_cream_groups_before_the_inherited_fields(capsys):
    from trl_cream.cli.parsing import CREAM_GROUPS, RESUME_HELP, cream_own_fields

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    cream = [title for title, _ in CREAM_GROUPS]
    assert titles[1 : 1 + len(cream)] == cream, titles  # after "general"
    assert titles[-1].startswith("inherited") and "CREAM: other" not in titles  # every CREAM field is grouped
    inherited = text.index("\n" + titles[-1])
    for name in cream_own_fields():
        assert text.index(f"  --{name} ") < inherited, name
    assert text.index("  --per_device_train_batch_size ") > inherited
    assert " ".join(RESUME_HELP.split()[:8]) in " ".join(text.split())
    assert text.startswith("usage: trl-cream train [--config FILE.yaml]")


def test_cli_logging_handler_is_info_unless_log_level_says_otherwise():
    import logging

    from trl_cream.cli.parsing import _StderrHandler, setup_logging
    from trl_cream.trainer.config import CreamConfig

    package = logging.getLogger("trl_cream")
    before = (package.level, list(package.handlers))
    package.handlers[:] = [h for h in package.handlers if not isinstance(h, _StderrHandler)]  # an earlier CLI run's

    def ours() -> int:
        return sum(isinstance(h, _StderrHandler) for h in package.handlers)

    try:
        setup_logging(CreamConfig(output_dir="x", use_cpu=True, report_to="none"))
        assert package.level == logging.INFO and ours() == 1
        setup_logging(CreamConfig(output_dir="x", use_cpu=True, report_to="none", log_level="error"))
        assert package.level == logging.ERROR and ours() == 1  # not added twice
    finally:
        package.setLevel(before[0])
        package.handlers[:] = before[1]


def test_eval_says_which_checkpoint_is_pi0(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoints", "M1=out/M1", "M2=out/M2", "M3=out/M3", "--tasks", "nope"])
    out = capsys.readouterr().out
    assert "the first checkpoint, M1 (out/M1), is taken as π_0" in out and "(2 pair(s))" in out
    assert "list M0 first" in out
