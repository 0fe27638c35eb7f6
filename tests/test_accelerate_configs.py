"""The shipped `examples/accelerate_configs/*.yaml` parse with accelerate's own config loader and hold the settings
CreamTrainer relies on (checked up front by `distributed.check_supported`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate_configs"


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [("multi_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_config_parses_with_accelerate(name, distributed_type):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    assert str(config.distributed_type).endswith(distributed_type)
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu


def test_sharded_configs_save_from_pretrained_folders():
    zero2 = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    zero3 = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert zero2["zero_stage"] == 2
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True and zero3["zero3_init_flag"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_every_config_is_tested():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == {"multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


def test_fsdp_config_builds_a_plugin_that_cream_accepts(monkeypatch):
    # What `accelerate launch --config_file fsdp.yaml` exports, turned into accelerate's FSDP plugin.
    from types import SimpleNamespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from trl_cream import distributed

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=plugin, num_processes=8))
    distributed.check_supported(accelerator, use_peft=False)
    with pytest.raises(ValueError, match="LoRA/QLoRA"):
        distributed.check_supported(accelerator, use_peft=True)
