"""Bad input, bad settings and faults: each gets one clear line naming what is wrong (or a counted skip), never a
traceback, never silence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DATA
from safetensors.torch import save_file
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.config import SafeKeyConfig
from safekey_trl.data import SafeKeyDataError, load_examples, load_safekey_dataset
from safekey_trl.data.annotate import write_rows

runner = CliRunner()
GOOD = [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:3]]


def one_line(result) -> str:
    return result.output.replace("\n", "")


def assert_no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# ---------------------------------------------------------------------------------------------------------------------
# Text that is not valid Unicode


def surrogate_file(tmp_path, suffix: str = ".jsonl") -> Path:
    """Three rows; row 2's question holds a lone surrogate, written as JSON allows it: the escape `\\ud800`."""
    rows = [json.dumps(GOOD[0]), json.dumps(GOOD[1]).replace('"question": "', '"question": "\\ud800', 1)]
    rows.append(json.dumps(GOOD[2]))
    path = tmp_path / f"data{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",".join(rows) + "]", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_is_a_bad_row_named_and_counted(tmp_path, suffix, tokenizer):
    path = surrogate_file(tmp_path, suffix)
    with pytest.raises(SafeKeyDataError) as caught:
        load_examples(str(path))
    assert (caught.value.row, caught.value.field_name) == (2, "question")
    assert "lone surrogate \\ud800 at character 0" in str(caught.value)
    dataset, _, report = load_safekey_dataset(str(path), tokenizer, skip_invalid=True)
    assert len(dataset) == 2 and report.by_field() == {"question": 1}


@pytest.mark.parametrize("command", ["validate", "stats"])
def test_data_commands_report_a_lone_surrogate(tmp_path, command):
    path = surrogate_file(tmp_path)
    result = runner.invoke(app, ["data", command, str(path)])
    assert_no_traceback(result)
    assert "invalid: 1" in result.output
    if command == "validate":
        assert result.exit_code == 1 and f"{path}: row 2, field 'question': a lone surrogate" in one_line(result)


def test_annotate_and_convert_name_the_row_and_leave_no_file_behind(tmp_path):
    path = surrogate_file(tmp_path)
    for command in (
        ["annotate", str(path), str(tmp_path / "out.jsonl")],
        ["convert", str(path), str(tmp_path / "out.jsonl"), "--from", "star1"],
    ):
        result = runner.invoke(app, ["data", *command])
        assert_no_traceback(result)
        assert result.exit_code == 1 and "row 2, field 'question': a lone surrogate" in one_line(result)
        assert "converted" not in result.output and "annotated" not in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    # skipping it writes the other rows
    result = runner.invoke(app, ["data", "annotate", str(path), str(tmp_path / "out.jsonl"), "--skip-invalid"])
    assert result.exit_code == 1 and len(load_examples(str(tmp_path / "out.jsonl"))[0]) == 2
    failed = json.loads((tmp_path / "out.failed.jsonl").read_text())
    assert failed["annotation_error"]["row"] == 2 and "lone surrogate" in failed["annotation_error"]["reason"]


def test_convert_prints_its_counts_only_once_the_rows_are_written(tmp_path):
    source, out = tmp_path / "star1.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"question": "q?", "response": "<think>\nA. B.\n</think>\n\nC."}) + "\n")
    out.mkdir()
    result = runner.invoke(app, ["data", "convert", str(source), str(out), "--harmful"])
    assert result.exit_code == 2 and f"error: {out}: is a directory" in one_line(result)
    assert "converted" not in result.output
    out.rmdir()
    result = runner.invoke(app, ["data", "convert", str(source), str(out), "--harmful"])
    assert result.exit_code == 0 and "1 rows read, 1 converted" in result.output


def test_a_failed_write_leaves_no_temporary_or_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    with pytest.raises(UnicodeEncodeError):  # fails before anything is written
        write_rows(out, [{"question": "\ud800"}])
    assert list(tmp_path.iterdir()) == []

    def full_disk(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)  # fails once the temporary file is written
    with pytest.raises(OSError, match="No space left"):
        write_rows(out, [{"question": "fine"}])
    assert list(tmp_path.iterdir()) == []


def test_bytes_that_are_not_utf8_name_the_file_and_the_line(tmp_path):
    lines = [json.dumps(GOOD[0]).encode(), b'{"question": "caf\xe9", "response": "x"}', json.dumps(GOOD[2]).encode()]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        SafeKeyDataError,
        match=r"latin1.jsonl: row 2, field '<encoding>': not UTF-8 text: byte 0xe9 "
        r"at column 18",
    ):
        load_examples(str(path))
    assert [e.row for e in load_examples(str(path), skip_invalid=True)[0]] == [1, 3]
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b"[\n" + lines[0] + b",\n" + lines[1] + b"]")
    with pytest.raises(
        SafeKeyDataError,
        match=r"latin1.json: row 0, field '<encoding>': not UTF-8 text: byte 0xe9 "
        r"at line 3, column 18",
    ):
        load_examples(str(whole))
    result = runner.invoke(app, ["data", "validate", str(whole)])
    assert result.exit_code == 1 and "byte 0xe9 at line 3" in one_line(result)
    assert_no_traceback(result)


# ---------------------------------------------------------------------------------------------------------------------
# Files that hold nothing, or are no file


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("empty.json", ""),
        ("list.json", "[]"),
        ("data.json", '{"data": []}'),
    ],
)
def test_a_file_without_rows_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="no rows"):
        load_examples(str(path))
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 2 and f"error: {path}: no rows" in one_line(result)
    assert "every row is valid" not in result.output


def test_a_directory_is_not_a_data_file(tmp_path):
    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    result = runner.invoke(app, ["data", "validate", str(folder)])
    assert result.exit_code == 2 and f"error: {folder}: is a directory, not a .jsonl file" in one_line(result)


def test_duplicate_rows_are_kept_with_a_warning_and_a_count(tmp_path, caplog):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [GOOD[0], GOOD[1], GOOD[0], GOOD[2], GOOD[0]]) + "\n")
    examples, report = load_examples(str(path))
    assert len(examples) == 5 and report.duplicates == [(3, 1), (5, 1)]
    assert "2 duplicate row(s), kept: row 3 repeats row 1, row 5 repeats row 1" in caplog.text
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 0 and "2 duplicate row(s), kept" in result.output
    # a different label is not a duplicate
    path.write_text(
        "\n".join(json.dumps(row) for row in [GOOD[0], dict(GOOD[0], unsafe=GOOD[0]["source"] == "4o_rewrite")]) + "\n"
    )
    assert load_examples(str(path))[1].duplicates == []


# ---------------------------------------------------------------------------------------------------------------------
# Settings


def test_max_length_shorter_than_every_prompt_says_nothing_is_left(tokenizer, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"nothing left to train on: of 48 valid rows, 48 dropped: the prompt alone "
        r"fills max_length=16",
    ):
        load_safekey_dataset(str(SAMPLE_DATA), tokenizer, max_length=16)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--max_length", "16", "--output_dir", str(tmp_path)])
    assert result.exit_code == 2 and "nothing left to train on" in one_line(result)
    assert_no_traceback(result)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"head_weight": math.nan}, "`head_weight` must be a finite number >= 0, got nan"),
        ({"qmm_weight": math.inf}, "`qmm_weight` must be a finite number >= 0, got inf"),
        ({"qmm_weight": -1.0}, "`qmm_weight` must be a finite number >= 0, got -1.0"),
        ({"auxiliary_epochs": 3, "num_train_epochs": 2}, "`auxiliary_epochs` (3) is more than `num_train_epochs`"),
    ],
)
def test_settings_that_cannot_train_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError) as caught:
        SafeKeyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **settings)
    assert message in str(caught.value)


def test_auxiliary_epochs_are_not_checked_against_epochs_the_trainer_ignores(tmp_path):
    config = SafeKeyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_train_epochs=1, max_steps=4)
    assert config.auxiliary_epochs == 2


def test_a_nan_weight_on_the_command_line_is_one_line(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--head_weight", "nan", "--output_dir", str(tmp_path)])
    assert result.exit_code == 2 and "`head_weight` must be a finite number >= 0, got nan" in one_line(result)


# ---------------------------------------------------------------------------------------------------------------------
# Output directories and checkpoints


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(taken)])
    assert result.exit_code == 2 and f"output_dir {taken}: exists and is not a directory" in one_line(result)
    assert taken.read_text() == "mine"


def fake_run(directory: Path, truncate: str | None = None) -> Path:
    """A run directory as export reads it: config, model weights and head weights, one of them truncated."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "trainer_state.json").write_text("{}")
    save_file({"weight": torch.zeros(64)}, str(directory / "model.safetensors"))
    save_file({"linear.weight": torch.zeros(8)}, str(directory / "safekey_head.safetensors"))
    if truncate:
        data = (directory / truncate).read_bytes()
        (directory / truncate).write_bytes(data[: len(data) // 2])
    return directory


def test_export_to_a_file_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    result = runner.invoke(app, ["export", str(fake_run(tmp_path / "run")), "--out", str(taken)])
    assert result.exit_code == 2 and f"{taken}: exists and is not a directory" in one_line(result)
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("truncated", ["model.safetensors", "safekey_head.safetensors"])
def test_a_truncated_checkpoint_is_named_on_export_and_on_resume(tmp_path, truncated):
    run = fake_run(tmp_path / "out" / "checkpoint-4", truncate=truncated)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "exported")])
    assert_no_traceback(result)
    assert result.exit_code == 2 and f"{run / truncated}: not a readable safetensors file" in one_line(result)
    for resume in (str(run), "true"):
        result = runner.invoke(
            app,
            ["train", "--recipe", "tiny", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", resume],
        )
        assert_no_traceback(result)
        assert result.exit_code == 2 and f"{run / truncated}: not a readable safetensors file" in one_line(result)


def test_ctrl_c_during_training_says_where_the_last_checkpoint_is(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(script_args, training_args, model_args):
        for step in (2, 10, 4):
            (out / f"checkpoint-{step}").mkdir(parents=True)
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("safekey_trl.sft.train", interrupted)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(out)])
    assert result.exit_code == 130
    assert f"interrupted: the last checkpoint is {out / 'checkpoint-10'}; resume with" in one_line(result)

    def interrupted_early(script_args, training_args, model_args):
        raise KeyboardInterrupt

    monkeypatch.setattr("safekey_trl.sft.train", interrupted_early)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(tmp_path / "none")])
    assert result.exit_code == 130 and "interrupted: no checkpoint saved yet" in one_line(result)


# ---------------------------------------------------------------------------------------------------------------------
# One set of row rules: annotate and convert refuse what validate refuses


@pytest.mark.parametrize(
    ("name", "content"), [("empty.jsonl", ""), ("list.json", "[]"), ("data.json", '{"data": []}')]
)
@pytest.mark.parametrize("command", ["annotate", "convert"])
def test_annotate_and_convert_refuse_a_file_without_rows(tmp_path, name, content, command):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", command, str(path), str(out)])
    assert_no_traceback(result)
    assert result.exit_code == 2 and f"error: {path}: no rows" in one_line(result)
    assert not out.exists()


def second_think_block_rows() -> list[dict]:
    response = "<think>\nOkay, the user asks a thing. But wait.\n</think>\n\n<think>\nMore.\n</think>\n\nNo."
    return [GOOD[0], {"question": "Q?", "response": response, "source": "x"}]


def test_annotate_and_convert_refuse_a_second_think_block_as_validate_does(tmp_path):
    path = tmp_path / "two.jsonl"
    write_rows(path, second_think_block_rows())
    for command in (["annotate"], ["convert", "--from", "star1"]):
        result = runner.invoke(app, ["data", command[0], str(path), str(tmp_path / "out.jsonl"), *command[1:]])
        assert_no_traceback(result)
        assert result.exit_code == 1, result.output
        assert f"{path}: row 2, field 'response': a second <think> block" in one_line(result)
    # An answer holding a second block after the first `</think>` is caught after normalising too
    path.write_text(json.dumps({"question": "Q?", "response": "A. B.</think>C<think>D</think>E", "source": "x"}))
    result = runner.invoke(app, ["data", "convert", str(path), str(tmp_path / "out.jsonl")])
    assert result.exit_code == 1 and "a second <think> block" in one_line(result)


def test_convert_checks_the_offsets_it_keeps_and_says_which_rows_still_need_them(tmp_path):
    plain = {k: v for k, v in GOOD[1].items() if k not in ("summary_end_idx", "next_sentence_end_idx")}
    unnormalised = dict(GOOD[2], response=GOOD[2]["response"].replace("\n</think>\n\n", "</think>"))
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(path, [GOOD[0], plain, unnormalised])
    result = runner.invoke(app, ["data", "convert", str(path), str(out)])
    assert result.exit_code == 0, result.output
    assert "no offsets yet" not in result.output
    assert f"written: {out} (1 with their offsets, checked; 2 without offsets yet:" in one_line(result)
    assert "offsets dropped: 1 (rows 3)" in one_line(result)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == GOOD[0] and "summary_end_idx" not in rows[2]
    # An offset validate refuses is refused here too, named
    write_rows(path, [dict(GOOD[0], next_sentence_end_idx=GOOD[0]["summary_end_idx"])])
    result = runner.invoke(app, ["data", "convert", str(path), str(out)])
    assert result.exit_code == 1 and "row 1, field 'next_sentence_end_idx': " in one_line(result)


def test_implausible_offsets_are_kept_and_counted_but_empty_trace_rows_are_not(tmp_path, caplog):
    row = dict(GOOD[0])
    response = row["response"]
    answer = response.index("\n</think>\n\n") + len("\n</think>\n\n")
    # U swallows the whole trace and `</think>`, K starts inside the answer's first word
    row.update(summary_end_idx=answer + 4, next_sentence_end_idx=answer + 30)
    path = tmp_path / "odd.jsonl"
    write_rows(path, [GOOD[1], row])
    examples, report = load_examples(str(path))
    assert len(examples) == 2 and report.count == 0
    assert [number for number, _ in report.implausible] == [2]
    reason = report.implausible[0][1]
    assert "U covers the whole non-empty trace and </think>" in reason and "K starts inside the word" in reason
    assert "1 row(s) with implausible offsets, kept (check them): row 2" in caplog.text
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 0 and "1 row(s) with implausible offsets" in one_line(result)
    assert "every row is valid" in result.output
    fixture = Path(__file__).parent / "fixtures" / "empty_trace_rows.json"
    assert load_examples(str(fixture))[1].implausible == []
    assert load_examples(str(SAMPLE_DATA))[1].implausible == []


def test_a_column_map_naming_a_missing_column_names_that_column(tmp_path):
    from safekey_trl.config import SafeKeyDatasetConfig
    from safekey_trl.data.mixture import load_mixture

    path = tmp_path / "prompts.jsonl"
    write_rows(path, [{k: v for k, v in GOOD[0].items() if k != "question"} | {"query": GOOD[0]["question"]}])
    config = SafeKeyDatasetConfig(path=str(path), column_map={"prompt": "question"})
    with pytest.raises(SafeKeyDataError) as caught:
        load_mixture([config])
    assert caught.value.field_name == "prompt"
    assert "missing (the mixture's column_map renames 'prompt' to 'question')" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# Options refused with their name, before anything loads


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max_steps", "0"], "`max_steps` must be a positive number of steps, or -1 to train for"),
        (["--save_strategy", "steps", "--save_steps", "0"], "`save_steps` must be > 0 with `save_strategy: steps`"),
        (["--max_length", "-5"], "`max_length` must be a positive number of tokens (or unset: no truncation), got -5"),
        (["--gradient_accumulation_steps", "0"], "`gradient_accumulation_steps` must be at least 1, got 0"),
        (["--non_finite_loss", "ignore"], "argument --non_finite_loss/--non-finite-loss: invalid choice: 'ignore'"),
    ],
)
def test_training_options_that_would_train_something_else_are_refused_by_name(tmp_path, options, message):
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output_dir", str(tmp_path / "out"), *options])
    assert_no_traceback(result)
    assert result.exit_code == 2 and message in one_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launch", [[], ["--accelerate", "ddp"], ["--dry-run"]])
def test_a_recipe_that_is_not_yaml_names_the_file_line_and_column(tmp_path, launch):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model_name_or_path: tiny:qwen2\nlearning_rate: [1e-3\nmax_steps: 2\n")
    result = runner.invoke(app, ["train", "--recipe", str(recipe), *launch])
    assert_no_traceback(result)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {recipe}: not valid YAML: line 3, column 10: expected ',' or ']', but got ':' (while parsing a flow "
        "sequence at line 2, column 16)"
    )


@pytest.mark.parametrize(
    ("command", "kind", "name"),
    [
        (["data", "validate", "someuser/some-dataset"], "dataset", "someuser/some-dataset"),
        (
            ["data", "validate", str(SAMPLE_DATA), "--tokenizer", "someorg/some-model"],
            "tokenizer",
            "someorg/some-model",
        ),
        (["train", "--recipe", "tiny", "--model_name_or_path", "someorg/some-model"], "model", "someorg/some-model"),
    ],
)
def test_a_hub_name_not_in_the_cache_offline_says_so(tmp_path, monkeypatch, command, kind, name):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    if command[0] == "train":
        command = [*command, "--output_dir", str(tmp_path / "out")]
    result = runner.invoke(app, command)
    assert_no_traceback(result)
    assert result.exit_code == 2
    assert f"error: {kind} '{name}': not a local path, and not in the local Hugging Face cache (" in one_line(result)
    assert "and the machine is offline (HF_HUB_OFFLINE=1)" in one_line(result)


def test_a_broken_template_file_is_named_with_the_jinja_error(tmp_path):
    broken, unknown = tmp_path / "broken.jinja", tmp_path / "mine.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }\n{% endfor %}")
    unknown.write_text("{{ messages[0].content }}")
    result = runner.invoke(app, ["data", "validate", str(SAMPLE_DATA), "--template", str(broken)])
    assert result.exit_code == 2
    assert one_line(result) == f"error: --template {broken}: not a valid Jinja template: unexpected '}}' (line 1)"
    result = runner.invoke(app, ["data", "validate", str(SAMPLE_DATA), "--template", str(unknown)])
    assert result.exit_code == 2
    assert one_line(result).startswith(f"error: --template {unknown}: The tokenizer's chat template is not one")
