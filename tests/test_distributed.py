"""Multi-process training as users launch it: `safekey-trl train --accelerate CONFIG --num_processes 2`, two CPU
processes over gloo, in bf16, with a sequential sampler and batch 1 per process on data where the processes disagree
about K (an LM-only row, a row whose K is cut by max_length). For DDP, ZeRO-2, ZeRO-3 and FSDP2 a run trains through
the auxiliary epoch with all three terms, matches one process with the same global batch, resumes bit-exactly from a
checkpoint of the plain epoch and exports a clean model with its float32 head. Each launch costs 20-30 s."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType, str_to_bool
from conftest import ROOT, SAMPLE_DATA
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from safekey_trl import DualPathSafetyHead
from safekey_trl.cli import app
from safekey_trl.heads import HEAD_WEIGHTS_NAME
from safekey_trl.sft import accelerate_launch_command
from safekey_trl.tiny import materialize_tiny

CLI = str(Path(sys.executable).parent / "safekey-trl")
# Test-only start-up code for the launched processes (sitecustomize): FSDP on CPU, and a record of ZeRO-3's trace
LAUNCH_SHIM = Path(__file__).parent / "launch_shim"
LOSSES = ("loss", "lm_loss", "qmm_loss", "head_loss")
TERMS = (*LOSSES, "qmm_key_accuracy", "head_accuracy")
STEPS = 8  # 2 epochs of 4 steps: 7 rows on 2 processes (the last step repeats row 0), the auxiliary terms in epoch 2
RESUME_FROM = 2  # a checkpoint of the plain epoch: the resumed run crosses into the auxiliary one
LAUNCH_TIMEOUT = 300  # a launch takes 15-30 s on 2 idle cores (ZeRO-3 offload compiles CPU Adam once: 2 minutes)


def mixed_rows() -> list[dict]:
    """Seven rows. Batch 1 on each of 2 processes, in order, gives the pairs (K, LM-only), (K cut by max_length 100,
    K), (K, K) and (K, row 0 again: accelerate repeats it to even out the last batch)."""
    sample = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]
    lm_only = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\n5"},
        ]
    }
    return [sample[0], lm_only, sample[1], sample[4], sample[5], sample[2], sample[7]]


def write_recipe(directory: Path, rows: list[dict]) -> Path:
    """The tiny recipe on `rows` (a mixture, so LM-only rows are allowed), bf16, batch 1, 2 epochs, the auxiliary
    terms in the second; SGD with momentum at a constant lr: the weights move by the gradients, so scaling errors
    show, and the optimizer has state to checkpoint (the head's starts only with the auxiliary epoch)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe.pop("save_total_limit")
    recipe.update(
        datasets=[{"path": str(data)}], max_length=100, bf16=True, num_train_epochs=2, auxiliary_epochs=1,
        per_device_train_batch_size=1, train_sampling_strategy="sequential", optim="sgd", optim_args="momentum=0.9",
        learning_rate=0.1,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="steps",
        save_steps=2, disable_tqdm=True,
    )  # fmt: skip
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(recipe: Path, output_dir: Path, *extra: str, accelerate: str | None = None, **env: str):
    command = [CLI, "train", "--recipe", str(recipe), "--output_dir", str(output_dir), *extra]
    if accelerate is not None:
        command += ["--accelerate", accelerate, "--num_processes", "2", "--main_process_port", str(free_port())]
    python_path = os.pathsep.join(filter(None, [str(LAUNCH_SHIM), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": python_path, **env}
    # Its own process group, ended whole on a timeout: processes whose collectives fall out of step can hang (gloo
    # waits 30 minutes), and the launcher's workers would outlive the command
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)}: still running after {LAUNCH_TIMEOUT} s (a hang?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launched(recipe: Path, output_dir: Path, *extra: str, accelerate: str | None = None, **env: str):
    result = launch(recipe, output_dir, *extra, accelerate=accelerate, **env)
    noise = ("FutureWarning", "return func(", "warnings.warn(")
    errors = "\n".join(line for line in result.stderr.splitlines() if not any(word in line for word in noise))
    assert result.returncode == 0, result.stdout[-2000:] + errors[-6000:]
    return result


def free_port() -> int:
    """A port no one listens on now: each launch its own, so that one still closing (or another launch on the
    machine) cannot hold accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Run:
    """What a run left in its output_dir."""

    output_dir: Path

    @property
    def logs(self) -> list[dict[str, float]]:
        history = json.loads((self.output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        return [{k: v for k, v in entry.items() if k in TERMS} for entry in history["log_history"] if "loss" in entry]

    @property
    def model(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.output_dir / "model.safetensors"))

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.output_dir / HEAD_WEIGHTS_NAME))

    @property
    def master_weights(self) -> dict[str, torch.Tensor] | None:
        """DeepSpeed's float32 master weights from the last checkpoint, head included (None: not a DeepSpeed run)."""
        checkpoint = self.output_dir / f"checkpoint-{STEPS}"
        if not (checkpoint / f"global_step{STEPS}").is_dir():
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))

    @property
    def float32_model(self) -> dict[str, torch.Tensor]:
        """The final weights in float32: DeepSpeed's master weights (its saved model is bf16), the saved model
        otherwise (float32 weights, bf16 compute)."""
        master = self.master_weights
        if master is None:
            return self.model
        return {key: value for key, value in master.items() if "safekey_head" not in key}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process, batch 1 and 2 accumulation steps: the same global batches of 2 rows, the same micro-batches; on
    one thread, as torchrun starts each process (bf16 matrix products round differently on two threads). Called with
    the flags the distributed run adds to the recipe; each set of flags runs once."""
    runs: dict[tuple[str, ...], Run] = {}

    def run(*flags: str) -> Run:
        if flags not in runs:
            directory = tmp_path_factory.mktemp("one-process")
            rows = mixed_rows()
            recipe = write_recipe(directory, [*rows, rows[0]])
            launched(recipe, directory / "out", "--gradient_accumulation_steps", "2", *flags, OMP_NUM_THREADS="1")
            runs[flags] = Run(directory / "out")
        return runs[flags]

    return run


def relative_update_difference(got: dict, expected: dict, initial: dict) -> float:
    """|Δgot − Δexpected| / |Δexpected| over all the weights, Δ the change from the initial weights."""
    difference = sum(float((got[key].float() - expected[key].float()).norm() ** 2) for key in initial)
    update = sum(float((expected[key].float() - initial[key]).norm() ** 2) for key in initial)
    return (difference / update) ** 0.5


# name: accelerate config, flags of both launches (and the one-process run), of the first launch, of the resumed one,
# environment
CONFIGS = {
    # DDP without gradient checkpointing, then resumed with it (non-reentrant): both DDP paths in two launches
    "ddp": ("ddp", [], ["--activation_checkpointing", "false"], ["--activation_checkpointing", "true"], {}),
    "zero2": ("zero2", [], [], [], {}),
    "zero3": ("zero3", [], [], [], {}),
    "fsdp2": ("fsdp", [], [], [], {"SAFEKEY_TEST_FSDP_ON_CPU": "1"}),
    # Offloading makes accelerate swap the optimizer for DeepSpeed's CPU Adam (any torch optimizer, SGD included):
    # AdamW on both sides. CPU Adam is compiled on first use, about 2 minutes on 2 cores: RUN_SLOW=1 runs it
    "zero3_offload": ("zero3_offload", ["--optim", "adamw_torch", "--learning_rate", "1e-3"], [], [], {}),
}
# Tolerances against one process, relative: (per-term losses, weight updates). DDP computes exactly as one process on
# one thread does (autocast, float32 weights): measured bit-identical weights. DeepSpeed computes with bf16 weights,
# and FSDP2 casts them (the head's too) to bf16 for the forward, while one process keeps them float32 under autocast:
# bf16 rounding, measured at <= 0.23% on the losses and 0.39% (FSDP2) to 0.92% (ZeRO-2/3) on the weight updates;
# with AdamW (ZeRO-3 offload), whose steps follow the gradients' signs, 1.6% and 2.0%.
# The accuracies are compared under DDP only: K's top-1 and the head's verdict are near ties at initialisation.
TOLERANCE = {
    "ddp": (1e-6, 1e-6),
    "zero2": (2e-2, 2e-2),
    "zero3": (2e-2, 2e-2),
    "fsdp2": (2e-2, 2e-2),
    "zero3_offload": (5e-2, 1e-1),
}
SLOW = pytest.mark.skipif(
    not str_to_bool(os.environ.get("RUN_SLOW", "0")), reason="compiles DeepSpeed's CPU Adam: set RUN_SLOW=1"
)


@pytest.mark.parametrize("name", [*list(CONFIGS)[:-1], pytest.param("zero3_offload", marks=SLOW)])
def test_two_processes_train_like_one_resume_and_export(name, one_process, tmp_path):
    config, flags, first_flags, resume_flags, env = CONFIGS[name]
    reference = one_process(*flags)
    recipe = write_recipe(tmp_path, mixed_rows())
    # Fresh caches: the tiny model is materialised, and the data featurised, by this launch's two processes at once
    caches = {"SAFEKEY_TRL_CACHE": str(tmp_path / "tiny-cache"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    trace = tmp_path / "zero3-trace"
    if name == "zero3":
        caches["SAFEKEY_TEST_ZERO3_TRACE"] = str(trace)
    result = launched(recipe, tmp_path / "run", *flags, *first_flags, accelerate=config, **env, **caches)
    run = Run(tmp_path / "run")

    # One process materialised the tiny model, whole (ZeRO-3 would have written empty partitions), one featurised
    # the data and logged at INFO; the other read both
    cached = load_file(str(next((tmp_path / "tiny-cache").glob("tiny-qwen2-*/model.safetensors"))))
    initial = load_file(str(materialize_tiny("tiny:qwen2") / "model.safetensors"))
    assert all(torch.equal(cached[key], value) for key, value in initial.items())
    output = result.stdout + result.stderr
    assert output.count("INFO safekey_trl.sft: mixture: 7 examples") == 1
    assert output.count("Featurizing:   0%") == 1  # one progress bar

    if name == "zero3":
        # ZeRO-3 keeps its parameter trace (prefetching, small weights such as the head's kept resident) from step to
        # step: the head and the query-masked pass run inside the one call of the model a step. It starts a new one
        # once, when the auxiliary epoch changes the modules a step runs
        assert (trace.read_text() if trace.exists() else "").count("rank 0") <= 1

    # Plain SFT, then all three terms on every step of the auxiliary epoch (with each process's stand-ins)
    logs = run.logs
    assert [set(entry) for entry in logs] == [{"loss", "lm_loss"}] * 4 + [set(TERMS)] * 4
    loss_tolerance, weight_tolerance = TOLERANCE[name]
    for step, (expected, got) in enumerate(zip(reference.logs, logs, strict=True), start=1):
        for key in LOSSES if name != "ddp" else TERMS:
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=loss_tolerance), f"step {step}: {key}"
    model = run.float32_model
    assert relative_update_difference(model, reference.float32_model, initial) < weight_tolerance
    head, expected_head = run.head, reference.head
    assert all(value.dtype == torch.float32 for value in head.values())
    master = run.master_weights
    if master is not None:  # DeepSpeed holds the head in bf16: its file comes from the float32 master weights
        assert all(torch.equal(value, master[f"safekey_head.{key}"]) for key, value in head.items())
    head_difference = sum(float((head[key] - expected_head[key]).norm() ** 2) for key in head) ** 0.5
    assert head_difference / sum(float(value.norm() ** 2) for value in expected_head.values()) ** 0.5 < (
        weight_tolerance
    )
    if name == "fsdp2":
        # Really sharded: each parameter a DTensor split over the two processes in the checkpoint, the head included
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(tmp_path / "run" / "checkpoint-2" / "pytorch_model_fsdp_0")).read_metadata()
        layer = metadata.state_dict_metadata["model.model.layers.0.mlp.up_proj.weight"]
        assert [chunk.sizes for chunk in layer.chunks] == [torch.Size([64, 64])] * 2  # of (128, 64)
        assert "model.safekey_head.understanding_head.weight" in metadata.state_dict_metadata

    # Resume from the plain epoch in a fresh output_dir (`true`: its last checkpoint): bit for bit the same run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / f"checkpoint-{RESUME_FROM}", resumed_dir / f"checkpoint-{RESUME_FROM}")
    resume = ["--resume_from_checkpoint", "true", *flags, *resume_flags]
    launched(recipe, resumed_dir, *resume, accelerate=config, **env)
    resumed = Run(resumed_dir)
    assert resumed.logs == logs
    for part in ("model", "head", "float32_model"):
        expected, got = getattr(run, part), getattr(resumed, part)
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[key], value) for key, value in expected.items()), part

    # Export: a clean causal LM that loads alone, and the float32 head beside it
    exported = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(resumed_dir), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    loaded, info = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    assert all(torch.equal(state[key], value) for key, value in resumed.model.items() if key in state)
    head_module = DualPathSafetyHead.from_pretrained(exported)
    assert all(torch.equal(value, head[key]) for key, value in head_module.state_dict().items())


def test_a_run_that_would_not_train_as_asked_stops_at_start_up(tmp_path):
    """Without the shim, accelerate runs the FSDP config as plain DDP on CPU; and DDP cannot run reentrant gradient
    checkpointing (the query-masked pass reuses the layers before one backward). Both are said at once."""
    recipe = write_recipe(tmp_path, mixed_rows())
    reentrant = ["--activation_checkpointing", "true", "--activation_checkpointing_kwargs", '{"use_reentrant": true}']
    result = launch(recipe, tmp_path / "run", *reentrant, accelerate="fsdp")
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "the accelerate config asks for FSDP, but accelerate set up MULTI_CPU" in output
    assert "DDP cannot train SafeKey with reentrant gradient checkpointing" in output
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("recipe", ["qwen7b", "llama8b", "qwen14b", "qwen3-8b"])
def test_full_fine_tune_recipes_launch_sharded(recipe):
    """A 7-14B full fine-tune does not fit a GPU unsharded (the dry run plans 89 GiB a process for qwen7b): the launch
    line a recipe shows runs it under ZeRO-3, through the command line, and its command resolves."""
    comments = (ROOT / "recipes" / f"{recipe}.yaml").read_text().splitlines()
    line = next(comment for comment in comments if comment.startswith("# Launch"))
    words = shlex.split(line.split(":", 1)[1].split("(see")[0])
    assert words[:4] == ["safekey-trl", "train", "--recipe", recipe]
    config = words[words.index("--accelerate") + 1]
    assert (
        load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{config}.yaml")).deepspeed_config["zero_stage"]
        == 3
    )
    command = accelerate_launch_command(
        config, recipe, [], num_processes=int(words[words.index("--num_processes") + 1])
    )
    assert command[command.index("--num_processes") + 1] == "8"


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
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2  # FSDP1 is deprecated in transformers 5


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
