"""Featurisation through `datasets.map`: row for row what the per-example loop gives, on one or several
processes, cached; the counts and the errors (file, row, field) are the loop's."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from conftest import SAMPLE_DATA, make_example

from safekey_trl.data import (
    FeaturizeStats,
    InvalidRowReport,
    SafeKeyDataError,
    SafeKeyExample,
    featurize,
    featurize_example,
    load_examples,
)


def loop_reference(examples, tokenizer, max_length):
    """The per-example loop `featurize` was before it went through `datasets.map`."""
    stats, rows, errors = FeaturizeStats(rows=len(examples)), [], []
    for example in examples:
        try:
            feature = featurize_example(example, tokenizer, max_length)
        except SafeKeyDataError as error:
            errors.append(str(error))
            continue
        if all(label == -100 for label in feature["labels"]):
            stats.dropped_no_response += 1
            continue
        if example.lm_only:
            stats.lm_only += 1
        elif not any(feature["key_mask"]):
            stats.key_truncated += 1
        rows.append(feature)
    stats.examples = len(rows)
    return rows, stats, errors


@pytest.fixture(scope="module")
def mixed_examples() -> list[SafeKeyExample]:
    """The sample's 48 rows, two LM-only rows, and one row whose K has no token of its own (row 99)."""
    sample, _ = load_examples(str(SAMPLE_DATA))
    lm_only = [
        SafeKeyExample(
            [{"role": "user", "content": f"Add {i} and {i}."}],
            f"<think>\nEasy.\n</think>\n\n{2 * i}",
            None,
            None,
            False,
            "reasoning.jsonl",
            i,
        )  # fmt: skip
        for i in (1, 2)
    ]
    no_key_token = make_example(understanding="Okay, so the user is asking abo", key="ut", rest=" it.")
    no_key_token = dataclasses.replace(no_key_token, source="bad.jsonl", row=99)
    return [*sample[:20], no_key_token, *lm_only, *sample[20:]]


@pytest.mark.parametrize(("max_length", "num_proc"), [(None, None), (160, 2), (40, None)])
def test_map_equals_the_loop_row_for_row(tokenizer, mixed_examples, max_length, num_proc):
    expected_rows, expected_stats, expected_errors = loop_reference(mixed_examples, tokenizer, max_length)
    report = InvalidRowReport()
    dataset, stats = featurize(
        mixed_examples, tokenizer, max_length, skip_invalid=True, report=report, num_proc=num_proc
    )
    assert dataset.to_list() == expected_rows
    assert stats == expected_stats
    assert (
        [str(error) for error in report.errors]
        == expected_errors
        == ["bad.jsonl: row 99, field 'next_sentence_end_idx': the key sentence K has no token of its own"]
    )
    assert dataset.features == featurize(mixed_examples[:1], tokenizer)[0].features
    assert dataset.features["input_ids"].feature.dtype == "int32"
    if max_length == 160:  # some K cut, none dropped
        assert 0 < stats.key_truncated < stats.examples and stats.dropped_no_response == 0
    if max_length == 40:  # some prompts fill it
        assert 0 < stats.dropped_no_response and stats.examples > 0


def test_a_bad_row_stops_featurising_with_its_file_row_and_field(tokenizer, mixed_examples):
    with pytest.raises(SafeKeyDataError, match=r"^bad\.jsonl: row 99, field 'next_sentence_end_idx'"):
        featurize(mixed_examples, tokenizer, num_proc=2)


def test_features_are_cached_per_tokenizer_and_max_length(tokenizer, mixed_examples):
    examples = mixed_examples[:5]
    first, _ = featurize(examples, tokenizer, 512)
    cache_file = first.cache_files[0]["filename"]
    written = os.path.getmtime(cache_file)
    again, _ = featurize(list(examples), tokenizer, 512)
    assert again.cache_files[0]["filename"] == cache_file and os.path.getmtime(cache_file) == written
    assert again.to_list() == first.to_list()
    shorter, _ = featurize(examples, tokenizer, 256)
    assert shorter.cache_files[0]["filename"] != cache_file


@pytest.mark.parametrize("max_length", [None, 160, 40])
def test_checking_without_features_counts_and_names_the_same(tokenizer, mixed_examples, max_length):
    """`data validate` featurises with `status_only`: the same counts and errors, no token lists kept."""
    from datasets import config

    full_report, status_report = InvalidRowReport(), InvalidRowReport()
    dataset, stats = featurize(mixed_examples, tokenizer, max_length, skip_invalid=True, report=full_report)
    cache = Path(config.HF_DATASETS_CACHE) / "safekey_features"
    before = set(cache.iterdir())
    checked, checked_stats = featurize(
        mixed_examples, tokenizer, max_length, skip_invalid=True, report=status_report, status_only=True
    )
    assert checked_stats == stats and [str(e) for e in status_report.errors] == [str(e) for e in full_report.errors]
    assert checked.column_names == []
    written = sum(path.stat().st_size for path in set(cache.iterdir()) - before)
    assert 0 < written < os.path.getsize(dataset.cache_files[0]["filename"]) / 20
