"""Faults during a run: a NaN, an interrupted or failed save, a full disk, a second run in the same folder, a
checkpoint from another run. Each loses nothing and says what happened in one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_example
from helpers import make_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.finite import NonFiniteLossError
from safekey_trl.outputs import DiskFullError
from safekey_trl.resume import latest_complete_checkpoint
from safekey_trl.run_lock import LOCK_NAME, STAGING_DIR, OutputDirInUseError, acquire, check_reuse, release

runner = CliRunner()


def one_line(result) -> str:
    return result.output.replace("\n", "")


def finite_weights(directory: Path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(str(directory / "model.safetensors")).values())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer):
    """A tiny run of 2 steps with a checkpoint after each, shared read-only (copy it to change it)."""
    from safekey_trl.tiny import build_tiny_model

    examples = [make_example(understanding=f"Okay, so the user asks thing {i}.") for i in range(8)]
    directory = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(
        directory, build_tiny_model(tokenizer), tokenizer, examples, save_strategy="steps", save_steps=1, max_steps=2
    )
    trainer.train()
    return directory, examples


def copy_run(trained_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run[0], target)
    return target


class PoisonStep(TrainerCallback):
    """Makes the hidden states NaN during one optimizer step (a forward hook on the final norm), as a diverging run
    would: every loss term and the gradients of that step are NaN."""

    def __init__(self, model, step: int):
        self.step, self.active = step, False
        model.model.norm.register_forward_hook(
            lambda module, args, output: output * float("nan") if self.active else None
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def test_a_nan_step_stops_training_naming_it_and_keeps_the_finite_checkpoints(
    tmp_path, make_model, tokenizer, examples
):
    model = make_model()
    trainer = make_trainer(tmp_path, model, tokenizer, examples, save_strategy="steps", save_steps=1, max_steps=4)
    trainer.add_callback(PoisonStep(model, step=2))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.train()
    # (8 examples, batch 4, 4 steps: 2 epochs, the auxiliary terms in the second, so step 2 has the LM term only)
    assert caught.value.step == 2 and caught.value.terms == ["lm_loss", "loss", "grad_norm"]
    message = str(caught.value)
    assert message.startswith(
        "training stopped at step 2: lm_loss, the total loss and the gradient norm are not finite"
    )
    assert f"the last checkpoint is {tmp_path / 'checkpoint-1'}" in message
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert finite_weights(tmp_path / "checkpoint-1")
    # The step was not applied: the model holds step 1's weights
    saved = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    for name, parameter in model.named_parameters():
        if name in saved:
            torch.testing.assert_close(parameter.detach(), saved[name])
    assert all(entry.get("loss") != 0 for entry in trainer.state.log_history)


def test_skipping_a_nan_step_leaves_the_weights_and_logs_it_never_as_zero(tmp_path, make_model, tokenizer, examples):
    model = make_model()
    trainer = make_trainer(
        tmp_path,
        model,
        tokenizer,
        examples * 2,
        save_strategy="steps",
        save_steps=1,
        max_steps=4,
        non_finite_loss="skip",
    )
    trainer.add_callback(PoisonStep(model, step=2))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    skipped = logs[1]
    assert skipped["loss"] != skipped["loss"] and skipped["skipped_steps"] == 1  # NaN: no step was taken, not 0
    assert "lm_loss" not in skipped  # the SafeKey terms of a skipped step are not averaged in
    assert all(0 < entry["loss"] < 100 for entry in (logs[0], *logs[2:])) and logs[3]["skipped_steps"] == 1
    one, two = (load_file(str(tmp_path / f"checkpoint-{step}" / "model.safetensors")) for step in (1, 2))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value)  # step 2 changed nothing
    assert finite_weights(tmp_path / "checkpoint-4")
    final = [entry for entry in trainer.state.log_history if "train_loss" in entry][0]
    assert 0 < final["train_loss"] < 100 and final["skipped_steps"] == 1
    assert trainer.run_facts().training["skipped_steps"] == 1


def test_the_issue_case_learning_rate_1e6_stops_with_one_line(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["train", "--recipe", "tiny", "--output_dir", str(out), "--learning_rate", "1e6", "--max_steps", "12"]
        + ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"],
    )
    assert result.exit_code == 2, result.output
    assert "error: training stopped at step 4: qmm_loss, the total loss and the gradient norm are not finite" in (
        one_line(result)
    )
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in one_line(result)
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"] and finite_weights(
        out / "checkpoint-2"
    )
    assert not (out / "model.safetensors").exists() and not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation beyond an epoch


def test_accumulation_beyond_an_epoch_warns_and_records_what_ran(tmp_path, make_model, tokenizer, examples, caplog):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, gradient_accumulation_steps=100)
    with caplog.at_level(logging.WARNING, logger="safekey_trl.trainer"):
        trainer.train()
    assert "gradient_accumulation_steps=100 is more than the 2 batch(es) of an epoch" in caplog.text
    assert "each optimizer step accumulates the whole epoch, 8 examples, not 400" in caplog.text
    trainer.save_run()
    training = json.loads((tmp_path / "safekey_config.json").read_text())["run"]["training"]
    assert training["effective_batch_size"] == 8 and training["gradient_accumulation_steps"] == 2
    assert training["gradient_accumulation_steps_asked"] == 100
    card = (tmp_path / "README.md").read_text()
    assert "| `effective_batch_size` | 8 | training |" in card


# ---------------------------------------------------------------------------------------------------------------------
# Interrupted and failed saves


def test_a_checkpoint_interrupted_mid_save_is_never_taken_for_complete(tmp_path, make_model, tokenizer, examples):
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, examples, save_strategy="steps", save_steps=1, max_steps=3
    )
    original = trainer._save_rng_state

    def interrupted(output_dir):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt  # Ctrl-C after the weights and optimizer are written, before the state
        original(output_dir)

    trainer._save_rng_state = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert (tmp_path / STAGING_DIR / "checkpoint-2" / "optimizer.pt").is_file()  # the half-written one, aside
    # Auto-resume takes the complete one, and the leftover is cleared
    resumed = make_trainer(tmp_path, make_model(), tokenizer, examples, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3 and not (tmp_path / STAGING_DIR).exists()


def test_ctrl_c_recommends_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(script_args, training_args, model_args):
        for step in (2, 3):
            (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / "checkpoint-2" / "trainer_state.json").write_text("{}")  # checkpoint-3 was being written
        raise KeyboardInterrupt

    monkeypatch.setattr("safekey_trl.sft.train", interrupted)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(out)])
    assert result.exit_code == 130
    assert f"the last checkpoint is {out / 'checkpoint-2'}; resume with" in one_line(result)
    monkeypatch.undo()
    result = runner.invoke(
        app,
        ["train", "--recipe", "tiny", "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-3")],
    )
    assert result.exit_code == 2
    assert (
        f"{out / 'checkpoint-3'}: an incomplete checkpoint (no trainer_state.json: its save was interrupted); the "
        in (one_line(result))
    )


def no_space_after_writing_half(real):
    """A safetensors writer on a disk that fills up half-way through the file."""

    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_a_full_disk_while_checkpointing_keeps_the_last_complete_one(
    tmp_path, make_model, tokenizer, examples, monkeypatch
):
    import transformers.modeling_utils

    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, examples, save_strategy="steps", save_steps=1, max_steps=3
    )
    real = transformers.modeling_utils.safe_save_file
    full = no_space_after_writing_half(real)
    monkeypatch.setattr(
        transformers.modeling_utils,
        "safe_save_file",
        lambda *args, **kwargs: (full if trainer.state.global_step == 2 else real)(*args, **kwargs),
    )
    with pytest.raises(DiskFullError) as caught:
        trainer.train()
    message = caught.value.strerror
    assert message.startswith("no space left on ") and " (mounted at " in message
    assert f"while writing {tmp_path / STAGING_DIR / 'checkpoint-2'}; kept: the last complete checkpoint " in message
    assert message.endswith(f"{tmp_path / 'checkpoint-1'}; the incomplete one was removed")
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / STAGING_DIR / "checkpoint-2").exists()


def test_a_full_disk_at_the_final_save_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import transformers.modeling_utils

    from safekey_trl.tiny import materialize_tiny

    materialize_tiny("tiny:qwen2")  # the disk fills after the model is there
    monkeypatch.setattr(
        transformers.modeling_utils,
        "safe_save_file",
        no_space_after_writing_half(transformers.modeling_utils.safe_save_file),
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["train", "--recipe", "tiny", "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]
    )
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    line = re.findall(r"error: .*", result.output)  # (after the progress bar of the write that failed)
    assert len(line) == 1 and line[0].startswith("error: no space left on ")
    assert line[0].endswith(f"while writing {out / STAGING_DIR / 'final'}; kept: no checkpoint; no partial file")
    assert not (out / "model.safetensors").exists() and not (out / STAGING_DIR / "final").exists()


def test_a_read_only_output_dir_fails_before_anything_loads(tmp_path, monkeypatch):
    real_open = os.open
    out = tmp_path / "out"

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output_dir was checked")

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("safekey_trl.sft.load_model_and_tokenizer", never)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(out)])
    assert result.exit_code == 2, result.output
    assert one_line(result) == f"error: output_dir {out}: cannot write there (Read-only file system)"


# ---------------------------------------------------------------------------------------------------------------------
# One run per output_dir


def test_a_live_run_holds_its_output_dir_and_a_stale_lock_is_taken_over(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": os.uname().nodename, "pid": live.pid, "process_start": None, "started": "2026-01-01 10:00"}
        lock.write_text(json.dumps(holder))
        with pytest.raises(OutputDirInUseError, match=rf"in use by another run: process {live.pid} on "):
            acquire(out)
        monkeypatch.setattr("safekey_trl.sft.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
        result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(out)])
        assert result.exit_code == 2 and f"output_dir {out} is in use by another run: process {live.pid}" in (
            one_line(result)
        )
        assert f"delete {lock}" in one_line(result)
    finally:
        live.kill()
        live.wait()
    # Its holder is gone now: the lock is stale, and taken over with a warning
    acquire(out)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"took over a stale lock: its holder, process {live.pid} on" in caplog.text
    release(out)
    assert not lock.exists()
    # On another host liveness cannot be checked: refused, with how to clear it
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 1234, "started": "2026-01-01 10:00"}))
    with pytest.raises(OutputDirInUseError, match="process 1234 on gpu-node-7, started 2026-01-01 10:00"):
        acquire(out)


def test_a_finished_run_is_not_trained_over_unless_resumed_or_overwritten(trained_run, tmp_path, monkeypatch):
    run = copy_run(trained_run, tmp_path)
    (run / "safekey_head.safetensors").write_bytes((run / "checkpoint-2" / "safekey_head.safetensors").read_bytes())
    monkeypatch.setattr("safekey_trl.sft.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    command = ["train", "--recipe", "tiny", "--output_dir", str(run), "--overwrite_output_dir", "false"]
    result = runner.invoke(app, command)
    assert result.exit_code == 2
    assert one_line(result) == (
        f"error: output_dir {run} holds a finished run (safekey_head.safetensors) and 2 checkpoint(s), the last "
        "checkpoint-2: a new run would overwrite it. Resume it with --resume_from_checkpoint true, give another "
        "--output_dir, or pass --overwrite_output_dir true to replace it."
    )
    (run / "safekey_head.safetensors").unlink()
    with pytest.raises(OutputDirInUseError, match=r"holds an earlier run's checkpoints \(checkpoint-2\)"):
        check_reuse(run, resuming=False, overwrite=False)
    check_reuse(run, resuming=True, overwrite=False)
    assert (run / "checkpoint-2").is_dir()
    check_reuse(run, resuming=False, overwrite=True)
    assert not list(run.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------------------------------
# Resuming from the wrong checkpoint


def test_resuming_a_full_fine_tune_from_a_lora_checkpoint_is_refused_before_loading(
    tmp_path, make_model, tokenizer, examples
):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "trainer_state.json"):
        (checkpoint / name).write_text('{"r": 16}')
    trainer = make_trainer(tmp_path, make_model(), tokenizer, examples, max_steps=5)
    with pytest.raises(
        ValueError,
        match=r"checkpoint-4 holds a LoRA adapter \(adapter_config.json\), but this run trains the full model",
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resuming_from_another_architecture_is_refused_before_loading(
    trained_run, tmp_path, make_model, tokenizer, examples
):
    run = copy_run(trained_run, tmp_path)
    trainer = make_trainer(run, make_model(architecture="llama"), tokenizer, trained_run[1], max_steps=3)
    loaded = []
    trainer._load_from_checkpoint = lambda *args, **kwargs: loaded.append(args)
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2 was not written by a run of this model \(model_type: checkpoint 'qwen2', model 'llama'\)",
    ):
        trainer.train(resume_from_checkpoint=True)
    assert loaded == []


def test_a_bit_exact_resume_does_not_warn_about_the_tied_lm_head(trained_run, tmp_path, make_model, tokenizer, caplog):
    run = copy_run(trained_run, tmp_path)
    trainer = make_trainer(run, make_model(), tokenizer, trained_run[1], max_steps=3)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    assert "missing keys" not in caplog.text


def test_two_processes_share_one_lock_and_one_decision_on_a_nan(tmp_path):
    """Under `accelerate launch` with 2 processes: only the main process takes the lock (the other sees it held by
    the main one), and a NaN that process 1 alone sees skips the step on both, so their weights stay the same."""
    from conftest import ROOT, SAMPLE_DATA

    from safekey_trl.sft import accelerate_launch_command

    data, out, report = tmp_path / "eight.jsonl", tmp_path / "out", tmp_path / "report"
    data.write_text("\n".join(SAMPLE_DATA.read_text().splitlines()[:8]) + "\n")
    report.mkdir()
    overrides = ["--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no"]
    overrides += ["--per_device_train_batch_size", "2", "--non_finite_loss", "skip", "--disable_tqdm", "true"]
    command = accelerate_launch_command("ddp", "tiny", overrides, num_processes=2)
    script = command.index("-m")
    command[script : script + 2] = [str(ROOT / "tests" / "fault_injection.py")]
    env = dict(os.environ, SAFEKEY_TEST_REPORT=str(report), SAFEKEY_TEST_NAN_STEP="2")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    seen = [json.loads((report / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0]["holder"]["pid"] == seen[1]["holder"]["pid"] == seen[0]["pid"] != seen[1]["pid"]
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "safekey_config.json").read_text())["run"]["training"]["skipped_steps"] == 1
    assert torch.equal(torch.load(report / "rank0.pt"), torch.load(report / "rank1.pt"))


# ---------------------------------------------------------------------------------------------------------------------
# Export: never over files it did not write; a full disk loses nothing


def test_export_refuses_a_folder_with_other_files_and_replaces_only_its_own(trained_run, tmp_path):
    checkpoint = trained_run[0] / "checkpoint-2"
    out = tmp_path / "out"
    out.mkdir()
    mine = {"README.md": "my notes", "config.json": '{"model_type": "other"}', "model.safetensors": "other weights"}
    for name, text in mine.items():
        (out / name).write_text(text)
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2
    assert one_line(result).startswith(
        f"error: {out}: not empty (3 entries: README.md, config.json, model.safetensors)"
    )
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2
    assert "the export would replace README.md, config.json, model.safetensors, which no export wrote" in (
        one_line(result)
    )
    assert {name: (out / name).read_text() for name in mine} == mine and sorted(
        p.name for p in out.iterdir()
    ) == sorted(mine)
    # Into a new folder, then again over its own export: allowed with --overwrite; a file of the user's is left alone
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, ["export", str(checkpoint), "--out", str(fresh)]).exit_code == 0
    (fresh / "notes.txt").write_text("keep me")
    assert runner.invoke(app, ["export", str(checkpoint), "--out", str(fresh)]).exit_code == 2
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(fresh), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (fresh / "notes.txt").read_text() == "keep me" and (fresh / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--out", "{run}"], "{run}: is the run folder being exported; give --out another folder"),
        (["--out", "{tmp}/x", "--merge", "--dtype", "float99"], "--dtype must be one of bfloat16, float16, float32"),
    ],
)
def test_export_options_that_cannot_work_are_one_line(trained_run, tmp_path, options, message):
    run = copy_run(trained_run, tmp_path) / "checkpoint-2"
    if "--merge" in options:  # made a LoRA run's checkpoint: the adapter and its config in place of the model
        (run / "config.json").unlink()
        (run / "model.safetensors").rename(run / "adapter_model.safetensors")
        (run / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b", "r": 8})
        )
    options = [option.format(run=run, tmp=tmp_path) for option in options]
    result = runner.invoke(app, ["export", str(run), *options])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and one_line(result).startswith("error: " + message.format(run=run))


def test_a_full_disk_during_export_leaves_the_target_as_it_was(trained_run, tmp_path, monkeypatch):
    import safekey_trl.export

    real = shutil.copy2

    def copy_until_full(source, target):
        if Path(source).name == "model.safetensors":
            Path(target).write_bytes(Path(source).read_bytes()[:28_000])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(safekey_trl.export.shutil, "copy2", copy_until_full)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(trained_run[0] / "checkpoint-2"), "--out", str(out)])
    assert result.exit_code == 2 and one_line(result).startswith("error: no space left on ")
    assert one_line(result).endswith(
        f"while writing {out / STAGING_DIR / 'export'}; kept: {out} as it was, no partial file"
    )
    assert list(out.iterdir()) == []
