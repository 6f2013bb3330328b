"""One flag style: TRL's underscores and `--config`, the dashed spellings kept as hidden aliases, TRL's boolean
values, and `train --help` listing the recipe's SafeKey fields."""

from __future__ import annotations

import re

import pytest
from conftest import SAMPLE_DATA
from typer.testing import CliRunner

from safekey_trl.cli import app

runner = CliRunner()


def options_in_help(*command: str) -> set[str]:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"--[a-z][a-z0-9_-]*", result.output))


@pytest.mark.parametrize(
    "command",
    [("train",), ("export",), ("data", "validate"), ("data", "stats"), ("data", "annotate"), ("data", "convert")],
)
def test_every_option_is_shown_with_underscores(command):
    shown = options_in_help(*command)
    assert shown and not [option for option in shown if "-" in option[2:]], shown


def test_overlapping_options_have_trls_names():
    assert {"--max_length", "--skip_invalid"} <= options_in_help("data", "validate")
    assert {"--config", "--dry_run", "--num_processes"} <= options_in_help("train")
    assert "--push_to_hub" in options_in_help("export")


@pytest.mark.parametrize("spelling", [["--max_length", "64"], ["--max-length", "64"], ["--max_length=64"]])
def test_dashed_spellings_still_work(spelling):
    result = runner.invoke(app, ["data", "stats", str(SAMPLE_DATA), *spelling])
    assert result.exit_code == 0, result.output
    assert "max_length=64: K cut in" in result.output


@pytest.fixture
def one_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q"}\n' + SAMPLE_DATA.read_text())
    return str(path)


@pytest.mark.parametrize(
    ("flags", "stops_at_first"),
    [
        ([], False),  # validate reports every bad row by default
        (["--skip_invalid", "false"], True),
        (["--skip_invalid=false"], True),
        (["--no-skip-invalid"], True),
        (["--no_skip_invalid"], True),
        (["--skip_invalid", "true"], False),
        (["--skip-invalid"], False),
    ],
)
def test_boolean_flags_take_trls_values(one_bad_row, flags, stops_at_first):
    result = runner.invoke(app, ["data", "validate", one_bad_row, *flags])
    assert result.exit_code == 1
    if stops_at_first:  # one error line, not the counted report
        assert result.output.startswith("invalid: ") and "rows read" not in result.output
    else:
        assert "49 rows read" in result.output and "invalid: 1" in result.output


@pytest.mark.parametrize("flag", ["--config", "--recipe"])
def test_train_takes_the_recipe_as_config(flag):
    result = runner.invoke(app, ["train", flag, "tiny", "--dry_run"])
    assert result.exit_code == 0, result.output
    assert "parameters:" in result.output


def test_train_help_lists_the_safekey_fields_with_their_defaults():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    for field, default in [("qmm_weight", 0.2), ("head_weight", 0.2), ("head_theta", 0.5), ("auxiliary_epochs", 2)]:
        assert f"--{field} (default: {default}):" in text
    assert "--qmm_mask_query (default: True)" in text and "--head_detach_hidden (default: False)" in text
    assert "--dataset_name (default: None)" in text and "--datasets (default: [])" in text
    assert "Every other field of TRL's SFTConfig" in text and "https://huggingface.co/docs/trl/sft_trainer" in text
