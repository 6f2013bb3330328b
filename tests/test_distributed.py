"""Data parallel through accelerate: 2 processes (gloo, CPU) train like 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import ROOT, SAMPLE_DATA
from safetensors.torch import load_file

from safekey_trl.sft import accelerate_launch_command

CLI = str(Path(sys.executable).parent / "safekey-trl")
SAFEKEY_LOGS = ("loss", "lm_loss", "qmm_loss", "qmm_key_accuracy", "head_loss", "head_accuracy")


def run(output_dir: Path, data: Path, *extra: str) -> dict:
    # Plain SGD at lr 1: the weights after a step are the gradient itself, so any scaling error shows
    command = [
        CLI, "train", "--recipe", "tiny", *extra,
        "--dataset_name", str(data), "--output_dir", str(output_dir), "--num_train_epochs", "2",
        "--auxiliary_epochs", "1", "--optim", "sgd", "--learning_rate", "1.0", "--lr_scheduler_type", "constant",
        "--warmup_steps", "0", "--weight_decay", "0", "--gradient_checkpointing", "true", "--save_strategy", "steps",
        "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    history = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    return {
        # SafeKey's terms and the total; TRL's own `mean_token_accuracy` averages micro-batch means, so it moves
        # with gradient accumulation by design
        "logs": [{k: v for k, v in entry.items() if k in SAFEKEY_LOGS} for entry in history[:2]],
        "model": load_file(str(output_dir / "model.safetensors")),
        "head": load_file(str(output_dir / "safekey_head.safetensors")),
    }


def test_two_processes_train_like_one(tmp_path):
    """Epoch 1 is plain SFT (the head unused), epoch 2 carries QMM and the head; gradient checkpointing on."""
    data = tmp_path / "eight.jsonl"
    data.write_text("\n".join(SAMPLE_DATA.read_text().splitlines()[:8]) + "\n")
    one = run(tmp_path / "one", data, "--per_device_train_batch_size", "8")
    runs = {
        "2 processes x 4": run(
            tmp_path / "ddp", data, "--accelerate", "ddp", "--num-processes", "2", "--per_device_train_batch_size", "4"
        ),
        "2 processes x 2 x 2 accumulation": run(
            tmp_path / "ddp-ga",
            data,
            "--accelerate",
            "ddp",
            "--num-processes",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
        ),  # fmt: skip
    }
    assert "qmm_loss" not in one["logs"][0] and "qmm_loss" in one["logs"][1] and "head_loss" in one["logs"][1]
    for name, other in runs.items():
        for expected, got in zip(one["logs"], other["logs"], strict=True):
            assert got.keys() == expected.keys(), name
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name}: {key}"
        for part in ("model", "head"):
            for key, value in one[part].items():
                torch.testing.assert_close(other[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "zero3_offload", "fsdp"])
def test_accelerate_configs_load(name):
    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP}.get(name, DistributedType.DEEPSPEED)
    assert config.distributed_type == expected and config.num_processes == 8 and config.mixed_precision == "bf16"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])
    if name.startswith("zero3"):
        assert config.deepspeed_config["zero3_save_16bit_model"]  # saving gathers the sharded weights
    if name == "zero3_offload":
        assert config.deepspeed_config["offload_optimizer_device"] == "cpu"


def test_launch_command_passes_multi_node_flags():
    command = accelerate_launch_command(
        "zero3", "qwen7b", ["--learning_rate", "2e-5"], num_processes=16, num_machines=2, machine_rank=1,
        main_process_ip="10.0.0.1", main_process_port=29500,
    )  # fmt: skip
    assert command[1:4] == ["launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "zero3.yaml")]
    flags = command[4:16]
    assert dict(zip(flags[::2], flags[1::2], strict=True)) == {
        "--mixed_precision": "bf16",
        "--num_processes": "16", "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "10.0.0.1",
        "--main_process_port": "29500",
    }  # fmt: skip
    assert command[16:] == ["-m", "safekey_trl", "train", "--recipe", "qwen7b", "--learning_rate", "2e-5"]
    # The recipe's precision wins over the accelerate config's bf16
    assert accelerate_launch_command("ddp", "tiny", [])[4:6] == ["--mixed_precision", "no"]
    assert accelerate_launch_command("ddp", "tiny", ["--bf16", "true"])[4:6] == ["--mixed_precision", "bf16"]
    assert accelerate_launch_command("ddp", "qwen7b", ["--bf16=false"])[4:6] == ["--mixed_precision", "no"]
    with pytest.raises(FileNotFoundError, match="No accelerate config 'zero4'"):
        accelerate_launch_command("zero4", "qwen7b", [])
