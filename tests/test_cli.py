"""The command line: the default recipe end to end, recipe parsing, and the data commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE_DATA
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.sft import parse_recipe

runner = CliRunner()


def test_default_recipe_trains_and_lowers_the_loss(tmp_path):
    """What `make train` runs: the tiny recipe, through the installed console script."""
    out = tmp_path / "tiny"
    command = [str(Path(sys.executable).parent / "safekey-trl"), "train", "--recipe", "tiny", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    state_files = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(state_files[-1].read_text())["log_history"]
    lm_losses = [entry["lm_loss"] for entry in history if "lm_loss" in entry]
    assert lm_losses[-1] < lm_losses[0] - 0.5
    assert any("qmm_loss" in entry and "head_loss" in entry for entry in history)
    assert (out / "model.safetensors").is_file() and (out / "safekey_head.safetensors").is_file()


def test_paper_recipes_parse_with_the_paper_settings():
    for name, model in [
        ("qwen7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ("llama8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
        ("qwen14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    ]:
        # Parsed here without a GPU: bf16 needs one unless `use_cpu` is set
        script_args, args, model_args = parse_recipe(name, ["--use_cpu", "true"])
        assert model_args.model_name_or_path == model
        assert (args.learning_rate, args.num_train_epochs, args.auxiliary_epochs) == (1e-5, 5, 2)
        assert (args.qmm_weight, args.head_weight, args.head_theta) == (0.2, 0.2, 0.5)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 128
        assert (args.max_length, args.bf16, args.gradient_checkpointing, args.seed) == (8192, True, True, 2002)
        assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.warmup_steps) == (0.9, 0.95, 1e-4, 0.05)
        assert args.lr_scheduler_type == "cosine"


@pytest.mark.parametrize("name", ["qwen7b-qlora", "llama8b-qlora", "qwen14b-qlora", "tiny-qlora"])
def test_qlora_recipes_load_4bit_with_lora_on_every_linear_layer(name):
    from safekey_trl.modeling import lora_targets

    script_args, args, model_args = parse_recipe(name, ["--use_cpu", "true"])
    assert model_args.load_in_4bit and model_args.use_peft and model_args.bnb_4bit_quant_type == "nf4"
    assert model_args.use_bnb_nested_quant and lora_targets(model_args) == "all-linear"
    assert (args.num_train_epochs, args.auxiliary_epochs, args.qmm_weight, args.head_weight) == (5, 2, 0.2, 0.2)
    if name != "tiny-qlora":
        assert model_args.dtype == "bfloat16" and args.gradient_checkpointing
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 128


def test_command_line_overrides_win_over_the_recipe():
    script_args, args, model_args = parse_recipe("tiny", ["--learning_rate", "0.5", "--qmm_weight", "0.7"])
    assert args.learning_rate == 0.5 and args.qmm_weight == 0.7
    assert script_args.dataset_name == "data/safekey_sample.jsonl"


def test_unknown_recipe_is_a_clear_error():
    result = runner.invoke(app, ["train", "--recipe", "nope"])
    assert result.exit_code == 2
    assert "No recipe 'nope'" in result.output and "qwen7b" in result.output


def test_invalid_training_data_stops_with_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE_DATA.read_text().splitlines()[0] + "\n" + '{"question": "q"}\n')
    result = runner.invoke(
        app, ["train", "--recipe", "tiny", "--dataset_name", str(bad), "--output_dir", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert f"{bad}: row 2, field 'response': missing" in result.output.replace("\n", "")


def test_data_validate_reports_counts():
    result = runner.invoke(app, ["data", "validate", str(SAMPLE_DATA), "--max-length", "256"])
    assert result.exit_code == 0, result.output
    assert "valid: 48 (24 harmful, 24 benign)" in result.output
    assert "K in the answer (outside the trace): 0" in result.output
    assert "every row is valid" in result.output


def test_data_validate_lists_every_bad_row(tmp_path):
    lines = SAMPLE_DATA.read_text().splitlines()[:3]
    rows = [json.loads(line) for line in lines]
    rows[1]["summary_end_idx"] = "7"
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(rows[0]), json.dumps(rows[1]), "{oops", json.dumps(rows[2])]) + "\n")
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    output = result.output.replace("\n", "")
    assert "invalid: 2" in output
    assert "row 2, field 'summary_end_idx'" in output and "row 3, field '<json>'" in output
    assert "valid: 2 (" in output


@pytest.mark.parametrize("row", [1, 7])
def test_data_inspect_shows_the_segments(row):
    result = runner.invoke(app, ["data", "inspect", str(SAMPLE_DATA), "--row", str(row)])
    assert result.exit_code == 0, result.output
    record = json.loads(SAMPLE_DATA.read_text().splitlines()[row - 1])
    key = record["response"][record["summary_end_idx"] : record["next_sentence_end_idx"]].strip()
    assert "K: key sentence" in result.output and key.split()[-1] in result.output
    assert record["question"][:20] in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["data", "validate", "missing.jsonl"],
        ["data", "inspect", "missing.jsonl"],
        ["data", "stats", "missing.jsonl"],
        ["train", "--recipe", "tiny", "--dataset_name", "missing.jsonl"],
    ],
)
def test_a_missing_file_is_one_line_not_a_traceback(tmp_path, command):
    command = [str(tmp_path / part) if part == "missing.jsonl" else part for part in command]
    result = runner.invoke(app, [*command, *(["--output_dir", str(tmp_path / "o")] if command[0] == "train" else [])])
    assert result.exit_code == 2, result.output
    assert f"error: {tmp_path / 'missing.jsonl'}: no such file" in result.output.replace("\n", "")
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["validate", "stats"])
def test_data_commands_count_rows_with_k_in_the_answer(command):
    fixture = ROOT / "tests" / "fixtures" / "empty_trace_rows.json"
    result = runner.invoke(app, ["data", command, str(fixture)])
    assert result.exit_code == 0, result.output
    assert "K in the answer (outside the trace): 4" in result.output


def test_the_recipes_template_and_eos_are_the_ones_trained_on(tmp_path):
    """`chat_template_path`, `eos_token` and `pad_token` are applied before the data is rendered: the trained text is
    the new template's and ends with the new EOS, and the saved tokenizer and model agree."""
    from safekey_trl.sft import train

    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    eos, pad = "<｜tool▁sep｜>", "<｜tool▁outputs▁end｜>"
    out = tmp_path / "out"
    overrides = ["--chat_template_path", str(template), "--chat_format", "verbatim", "--eos_token", eos]
    overrides += ["--pad_token", pad, "--max_steps", "1", "--output_dir", str(out), "--save_strategy", "no"]
    trainer = train(*parse_recipe("tiny", overrides))
    tokenizer = trainer.processing_class
    row = json.loads(SAMPLE_DATA.read_text().splitlines()[0])
    text = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    assert text == f"[user] {row['question']}\n[assistant] {row['response']}{eos}"
    assert trainer.train_dataset[0]["input_ids"][-1] == tokenizer.convert_tokens_to_ids(eos)
    assert trainer.data_collator.pad_token_id == tokenizer.convert_tokens_to_ids(pad)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == template.read_text() and saved.eos_token == eos and saved.pad_token == pad
    assert tokenizer.convert_tokens_to_ids(eos) in trainer.model.generation_config.eos_token_id


def test_a_recipe_without_data_is_an_error_as_in_trl(tmp_path):
    recipe = tmp_path / "nodata.yaml"
    recipe.write_text(
        "\n".join(
            line
            for line in (ROOT / "recipes" / "tiny.yaml").read_text().splitlines()
            if (not line.startswith("dataset_name"))
        )
    )
    result = runner.invoke(app, ["train", "--config", str(recipe), "--max_steps", "1", "--output_dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "The recipe names no data: set `dataset_name`" in result.output.replace("\n", "")
    # The tiny recipe names the sample itself
    script_args, _, _ = parse_recipe("tiny")
    assert script_args.dataset_name == "data/safekey_sample.jsonl"


@pytest.mark.parametrize("flag", ["--accelerate", "--accelerate_config", "--accelerate-config"])
def test_trls_accelerate_config_flag_names_the_accelerate_config(monkeypatch, flag):
    launched = []
    monkeypatch.setattr(
        subprocess, "run", lambda command: launched.append(command) or subprocess.CompletedProcess(command, 0)
    )
    result = runner.invoke(app, ["train", "--config", "tiny", flag, "ddp", "--num_processes", "2"])
    assert result.exit_code == 0, result.output
    (command,) = launched
    assert command[command.index("--config_file") + 1].endswith("ddp.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    result = runner.invoke(app, ["train", "--config", "tiny", flag, "nope"])
    assert result.exit_code == 2 and "No accelerate config 'nope'" in result.output


@pytest.mark.parametrize("command", ["validate", "stats"])
def test_data_commands_count_with_the_recipes_tokenizer_and_say_which(tmp_path, command):
    from safekey_trl.data import featurize, load_examples
    from safekey_trl.tiny import load_tokenizer

    recipe = tmp_path / "qwen3.yaml"
    recipe.write_text(
        f"model_name_or_path: tiny:qwen3\ndataset_name: {SAMPLE_DATA}\nmax_length: 160\nuse_cpu: true\nbf16: false\n"
    )
    examples, _ = load_examples(str(SAMPLE_DATA))
    _, expected = featurize(examples, load_tokenizer("tiny:qwen3"), 160)
    _, toy = featurize(examples, load_tokenizer("tiny:qwen2"), 160)
    assert expected.key_truncated != toy.key_truncated  # the tokenizer matters to the count
    cut = (
        f"K cut by max_length=160: {expected.key_truncated}"
        if command == "validate"
        else (f"max_length=160: K cut in {expected.key_truncated}")
    )
    for arguments in ([str(SAMPLE_DATA), "--recipe", str(recipe)], ["--recipe", str(recipe)]):
        result = runner.invoke(app, ["data", command, *arguments])
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())
        assert f"tokens counted with tiny:qwen3 (the model of recipe {recipe})" in output
        assert cut in output
    result = runner.invoke(app, ["data", command, str(SAMPLE_DATA)])
    assert "tokens counted with tiny:qwen2 (the embedded toy tokenizer" in " ".join(result.output.split())


@pytest.mark.parametrize("command", [["--help"], ["recipes"]])
def test_help_and_recipes_load_no_training_stack(command):
    """`safekey-trl --help` and `recipes` import neither torch, transformers, TRL nor bitsandbytes (so they print no
    bitsandbytes warning and start at once); checked on what Python imported, not on a clock."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "safekey_trl", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time")}
    heavy = {"torch", "transformers", "trl", "bitsandbytes", "datasets", "peft", "accelerate"}
    assert not {name for name in imported if name.split(".")[0] in heavy}
    assert "safekey_trl.cli" in imported
    warnings = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    assert not warnings


@pytest.mark.parametrize("recipe", ["tiny", "qwen7b-qlora"])
def test_recipes_parse_without_the_gradient_checkpointing_warning(recipe):
    """transformers 5 deprecates `gradient_checkpointing` with a FutureWarning whenever it is set; TRL sets it by
    default. A recipe that never names it (the tiny one), or names the new `activation_checkpointing` (the shipped
    ones), gets no warning and TRL's default: checkpointing on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, _ = parse_recipe(recipe, ["--use_cpu", "true"])
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert args.activation_checkpointing and args.gradient_checkpointing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, _ = parse_recipe("tiny", ["--gradient_checkpointing", "false"])  # the old name still works
    assert not args.activation_checkpointing and not args.gradient_checkpointing


def test_training_ends_the_run(tmp_path, monkeypatch):
    """`sft.train` ends with the trainer's `end()`, as TRL's script does: trackers finished and the process group
    destroyed (under NCCL a group left alive at exit warns, or hangs)."""
    from safekey_trl.trainer import SafeKeySFTTrainer

    ended = []
    monkeypatch.setattr(SafeKeySFTTrainer, "end", lambda self: ended.append(self.state.global_step))
    command = ["train", "--recipe", "tiny", "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(tmp_path)]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert ended == [1] and (tmp_path / "model.safetensors").is_file()
