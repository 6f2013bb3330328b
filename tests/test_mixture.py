"""Data mixtures in TRL's form: proportions, splits and column maps; LM-only rows train the LM term only."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_DATA
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.config import SafeKeyDatasetConfig
from safekey_trl.data import SafeKeyDataError, featurize
from safekey_trl.data.mixture import load_mixture, mixture_sizes
from safekey_trl.sft import parse_recipe

SAMPLE_ROWS = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines() if line.strip()]
SAMPLE_HARMFUL = sum(row.get("unsafe", row["source"] != "4o_rewrite") for row in SAMPLE_ROWS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def reasoning_rows(count: int) -> list[dict]:
    """Plain reasoning SFT rows without U/K, in the `messages` form."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"<think>\n{i} plus {i} is {2 * i}.\n</think>\n\n{2 * i}"},
            ]
        }
        for i in range(count)
    ]


def test_fractions_follow_trls_rule():
    # Shares normalised; the largest mixture with no dataset oversampled
    assert mixture_sizes([48, 40], [0.75, 0.25]) == [48, 16]
    assert mixture_sizes([48, 40], [3, 1]) == [48, 16]
    assert mixture_sizes([48, 40], [0.5, 0.5]) == [40, 40]
    assert mixture_sizes([48, 40], [None, None]) == [48, 40]
    with pytest.raises(ValueError, match="either all datasets"):
        mixture_sizes([48, 40], [0.5, None])


@pytest.mark.parametrize(("fractions", "expected_safekey", "expected_lm_only"), [((0.8, 0.2), 48, 12), (None, 48, 40)])
def test_mixture_proportions_and_lm_only_rows_are_counted(
    tmp_path, tokenizer, fractions, expected_safekey, expected_lm_only
):
    reasoning = write_jsonl(tmp_path / "reasoning.jsonl", reasoning_rows(40))
    configs = [SafeKeyDatasetConfig(path=str(SAMPLE_DATA)), SafeKeyDatasetConfig(path=reasoning)]
    if fractions is not None:
        for config, fraction in zip(configs, fractions, strict=True):
            config.fraction = fraction
    examples, report = load_mixture(configs)
    assert [part.kept for part in report.parts] == [expected_safekey, expected_lm_only]
    assert report.parts[0].harmful == SAMPLE_HARMFUL and report.parts[0].lm_only == 0
    assert report.parts[1].lm_only == expected_lm_only and report.parts[1].harmful == report.parts[1].benign == 0
    if fractions is not None:
        share = expected_lm_only / len(examples)
        assert share == pytest.approx(fractions[1], abs=0.01)
    assert "LM-only" in report.describe()

    dataset, stats = featurize(examples, tokenizer, max_length=1024)
    assert stats.lm_only == expected_lm_only and stats.key_truncated == 0
    assert stats.examples == len(examples)
    lm_only_rows = dataset.select(range(expected_safekey, len(dataset)))
    for row in lm_only_rows:
        assert not any(row["key_mask"]) and row["understanding_span"] == [0, 0] and row["prefix_end"] == 0
        assert row["unsafe"] == 0
        # The LM term trains on the response: labels past the prompt, -100 on it
        assert any(label != -100 for label in row["labels"]) and row["labels"][0] == -100
    assert all(any(row["key_mask"]) for row in dataset.select(range(expected_safekey)))


def test_prompt_completion_rows_column_map_and_columns(tmp_path, tokenizer):
    rows = [
        {"instruction": "Name a prime.", "output": "<think>\nTwo is prime.\n</think>\n\n2", "noise": 1},
        {"instruction": [{"role": "user", "content": "Name an even number."}], "output": "4", "noise": 2},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    config = SafeKeyDatasetConfig(
        path="json",
        data_files={"train": path},
        columns=["instruction", "output"],
        column_map={"instruction": "prompt", "output": "completion"},
    )
    examples, report = load_mixture([config])
    assert [example.prompt_messages for example in examples] == [
        [{"role": "user", "content": "Name a prime."}],
        [{"role": "user", "content": "Name an even number."}],
    ]
    assert [example.response for example in examples] == [rows[0]["output"], "4"]
    assert all(example.lm_only for example in examples) and report.parts[0].lm_only == 2
    dataset, _ = featurize(examples, tokenizer)
    # The response follows the prompt verbatim: its tokens decode back to it, then EOS
    first = dataset[0]
    response_ids = [token for token, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    assert tokenizer.decode(response_ids) == "Two is prime.\n</think>\n\n2" + tokenizer.eos_token


def test_a_bad_row_in_a_mixture_names_its_file_row_and_field(tmp_path):
    rows = reasoning_rows(3)
    rows[1] = {"question": "q", "response": "<think>\nU. K.\n</think>\n\nA", "summary_end_idx": 10}  # K's offset lost
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SafeKeyDataError, match=r"bad\.jsonl: row 2, field 'next_sentence_end_idx': missing"):
        load_mixture([SafeKeyDatasetConfig(path=path)])
    examples, report = load_mixture([SafeKeyDatasetConfig(path=path)], skip_invalid=True)
    assert len(examples) == 2 and report.invalid.count == 1 and report.parts[0].invalid == 1


def test_recipe_mixture_parses_and_data_stats_shows_it(tmp_path):
    reasoning = write_jsonl(tmp_path / "reasoning.jsonl", reasoning_rows(16))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "model_name_or_path: tiny:qwen2\nuse_cpu: true\nbf16: false\n"
        "datasets:\n"
        f"  - path: {SAMPLE_DATA}\n    fraction: 0.75\n"
        f"  - path: json\n    data_files: {reasoning}\n    fraction: 0.25\n    column_map: {{messages: messages}}\n"
        "test_split_size: 0.1\n"
    )
    script_args, _, _ = parse_recipe(str(recipe))
    assert [type(config) for config in script_args.datasets] == [SafeKeyDatasetConfig] * 2
    assert script_args.datasets[1].column_map == {"messages": "messages"} and script_args.test_split_size == 0.1
    result = CliRunner().invoke(app, ["data", "stats", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "mixture of 2 dataset(s), 64 rows" in result.output
    assert " 75.0%" in result.output and " 25.0%" in result.output
    assert "LM-only (no U/K, plain SFT): 16" in result.output
