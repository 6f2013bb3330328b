"""Converting STAR-1 and `messages` rows to the SafeKey format, and `data stats`."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_DATA
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.data import SafeKeyDataError, featurize, load_examples
from safekey_trl.data.convert import convert_file, convert_row, normalize_response, parse_column_map
from safekey_trl.data.stats import compute_stats, histogram, percentile, render_stats

runner = CliRunner()
TRACE = "Okay, so the user wants to make a weapon at home. But wait, that could hurt people. I should refuse."
RESPONSE = f"<think>\n{TRACE}\n</think>\n\nI can't help with that."


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def star1_row(i: int = 1, **overrides) -> dict:
    row = {"id": i, "question": "How do I make a weapon?", "response": RESPONSE, "category": "Weapons"}
    row |= {"source": "HarmBench", "score": {"safety": 10}}
    return row | overrides


# ---------------------------------------------------------------------------------------------------------------------
# Responses


@pytest.mark.parametrize(
    ("text", "reasoning"),
    [
        (RESPONSE, None),
        (f"{TRACE}\n</think>\n\nI can't help with that.", None),  # R1 leaves <think> in the generation prompt
        (f"  <think>{TRACE}</think>I can't help with that.\n", None),
        ("I can't help with that.", f"\n{TRACE}\n"),  # reasoning_content beside the answer
    ],
)
def test_normalize_response(text, reasoning):
    assert normalize_response(text, reasoning) == RESPONSE


@pytest.mark.parametrize("text", ["No think block here.", "<think>\n  \n</think>\n\nAnswer."])
def test_normalize_response_rejects(text):
    with pytest.raises(ValueError):
        normalize_response(text)


# ---------------------------------------------------------------------------------------------------------------------
# STAR-1


def test_star1_keeps_every_field_and_its_source_label():
    row = star1_row(response=f"{TRACE}\n</think>\n\nI can't help with that.")
    converted = convert_row(row, "star1")
    assert converted == star1_row()  # every field kept, the response normalized, no label added
    assert convert_row(star1_row(source="4o_rewrite"), "star1")["source"] == "4o_rewrite"
    benign = convert_row(star1_row(), "star1", label="benign")
    assert benign["unsafe"] is False and benign["source"] == "HarmBench"


def test_star1_errors_name_file_row_and_field(tmp_path):
    path = tmp_path / "star1.jsonl"
    write_jsonl(path, [star1_row(1), star1_row(2, response="no reasoning"), star1_row(3, question=None)])
    with pytest.raises(SafeKeyDataError) as raised:
        convert_file(str(path), "star1")
    assert str(raised.value).startswith(f"{path}: row 2, field 'response': no reasoning trace")
    rows, report = convert_file(str(path), "star1", skip_invalid=True)
    assert [row["id"] for row in rows] == [1]
    assert [(error.row, error.field_name) for error in report.errors] == [(2, "response"), (3, "question")]
    path.write_text(json.dumps(star1_row()) + "\n{not json\n")
    with pytest.raises(SafeKeyDataError, match="row 2, field '<json>'"):
        convert_file(str(path), "star1")
    with pytest.raises(SafeKeyDataError, match="row 0, field 'source': no label"):
        convert_row({k: v for k, v in star1_row().items() if k != "source"}, "star1")


def test_column_map_renames_before_converting():
    row = {"prompt": "How do I make a weapon?", "completion": RESPONSE, "is_harmful": False}
    mapping = parse_column_map(["prompt=question", "completion=response", "is_harmful=unsafe"])
    converted = convert_row(row, "star1", column_map=mapping)
    assert converted == {"question": row["prompt"], "response": RESPONSE, "unsafe": False}
    with pytest.raises(SafeKeyDataError, match="field 'prompt': missing"):
        convert_row({"question": "q", "response": RESPONSE}, "star1", column_map=mapping)
    with pytest.raises(SafeKeyDataError, match="field 'unsafe': expected bool"):
        convert_row(row | {"is_harmful": "yes"}, "star1", column_map=mapping)
    with pytest.raises(ValueError, match="old=new"):
        parse_column_map(["prompt"])


# ---------------------------------------------------------------------------------------------------------------------
# messages


def test_messages_with_one_user_turn_become_question_and_response():
    row = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": RESPONSE}], "tag": 7}
    assert convert_row(row, "messages", label="harmful") == {
        "question": "Q?",
        "response": RESPONSE,
        "tag": 7,
        "unsafe": True,
    }


def test_messages_with_a_system_prompt_stay_messages_and_reasoning_content_is_used():
    assistant = {"role": "assistant", "content": "I can't help with that.", "reasoning_content": TRACE}
    row = {"messages": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Q?"}, assistant]}
    converted = convert_row(row | {"source": "4o_rewrite"}, "messages")
    assert converted["messages"][:2] == row["messages"][:2]
    assert converted["messages"][2] == {"role": "assistant", "content": RESPONSE}
    assert converted["source"] == "4o_rewrite"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (None, "missing"),
        ([{"role": "user", "content": "Q?"}], "last turn must be the assistant"),
        ([{"role": "assistant", "content": RESPONSE}], "no user turn"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": RESPONSE}], "list of"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no trace"}], "no reasoning trace"),
    ],
)
def test_messages_errors_name_the_field(messages, message):
    with pytest.raises(SafeKeyDataError, match=f"field 'messages': .*{message}"):
        convert_row({"messages": messages, "unsafe": True}, "messages")


def test_messages_without_a_label_need_one():
    row = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": RESPONSE}]}
    with pytest.raises(SafeKeyDataError, match="--benign or --harmful"):
        convert_row(row, "messages")


# ---------------------------------------------------------------------------------------------------------------------
# The command, chained into annotate


def test_cli_convert_then_annotate_gives_rows_that_load(tmp_path):
    star1 = tmp_path / "star1.jsonl"
    write_jsonl(star1, [star1_row(i) for i in range(3)])
    out = tmp_path / "safekey.jsonl"
    result = runner.invoke(
        app, ["data", "convert", str(star1), str(out), "--from", "star1", "--annotate", "heuristic"]
    )
    assert result.exit_code == 0, result.output
    assert "3 converted (3 harmful, 0 benign)" in result.output and "3 annotated" in result.output
    examples, report = load_examples(str(out))
    assert len(examples) == 3 and report.count == 0 and all(example.unsafe for example in examples)
    key = RESPONSE[examples[0].summary_end_idx : examples[0].next_sentence_end_idx]
    assert key == " But wait, that could hurt people."

    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": RESPONSE}]}])
    plain = tmp_path / "chat_safekey.jsonl"
    result = runner.invoke(app, ["data", "convert", str(chat), str(plain), "--from", "messages", "--benign"])
    assert result.exit_code == 0, result.output
    assert "data annotate" in result.output  # the next step is named
    assert read_jsonl(plain) == [{"question": "Q?", "response": RESPONSE, "unsafe": False}]
    result = runner.invoke(app, ["data", "annotate", str(plain), str(tmp_path / "annotated.jsonl")])
    assert result.exit_code == 0, result.output
    assert not load_examples(str(tmp_path / "annotated.jsonl"))[0][0].unsafe


def test_cli_convert_reports_a_bad_row_and_bad_options(tmp_path):
    star1 = tmp_path / "star1.jsonl"
    write_jsonl(star1, [star1_row(1), star1_row(2, question=3)])
    result = runner.invoke(app, ["data", "convert", str(star1), str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1
    assert f"{star1}: row 2, field 'question': expected str, got int" in result.output
    result = runner.invoke(app, ["data", "convert", str(star1), str(tmp_path / "o.jsonl"), "--from", "sharegpt"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["data", "convert", str(star1), str(tmp_path / "o.jsonl"), "--benign", "--harmful"])
    assert result.exit_code == 2


# ---------------------------------------------------------------------------------------------------------------------
# stats


def test_percentile_and_histogram():
    values = list(range(1, 11))
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 100)) == (5, 9, 10)
    assert percentile([7], 90) == 7
    lines = histogram([1, 1, 2, 10], bins=3, width=4)
    assert [line.split()[:2] for line in lines] == [["1-4", "3"], ["5-7", "0"], ["8-10", "1"]]
    assert lines[0].endswith("####") and lines[2].endswith(" #")


def test_stats_match_what_featurize_trains_on(tokenizer):
    stats = compute_stats(str(SAMPLE_DATA), tokenizer, max_length=200)
    examples, _ = load_examples(str(SAMPLE_DATA))
    dataset, featurized = featurize(examples, tokenizer)
    assert (stats.rows, stats.harmful, stats.benign) == (48, 24, 24)
    assert stats.understanding_tokens == [end - start for start, end in dataset["understanding_span"]]
    assert stats.key_tokens == [sum(mask) for mask in dataset["key_mask"]]
    assert stats.total_tokens == [len(ids) for ids in dataset["input_ids"]]
    _, cut = featurize(examples, tokenizer, max_length=200)
    assert stats.key_cut == cut.key_truncated >= 1 and stats.dropped == cut.dropped_no_response
    assert compute_stats(str(SAMPLE_DATA), tokenizer, max_length=20).dropped == 48  # every prompt is longer


def test_stats_on_a_small_file(tmp_path, tokenizer):
    response = "<think>\nOkay, the user asks a thing. But wait, no. Done.\n</think>\n\nNo."
    u_end = len("<think>\nOkay, the user asks a thing.")
    row = {"question": "Q?", "response": response, "summary_end_idx": u_end, "next_sentence_end_idx": u_end + 12}
    path = tmp_path / "small.jsonl"
    write_jsonl(path, [row | {"source": "a"}, row | {"source": "4o_rewrite"}, row | {"unsafe": True}, {"bad": 1}])
    stats = compute_stats(str(path), tokenizer, max_length=10_000)
    assert (stats.rows, stats.harmful, stats.benign, stats.report.count, stats.key_cut) == (4, 2, 1, 1, 0)
    assert len(set(stats.key_tokens)) == 1  # the same row three times
    text = render_stats(stats, str(path))
    assert "4 rows, 3 measured (2 harmful, 1 benign)" in text and "invalid: 1" in text
    assert f"K (key sentence) tokens: min {stats.key_tokens[0]}, median {stats.key_tokens[0]}" in text
    result = runner.invoke(app, ["data", "stats", str(path), "--max-length", "10000"])
    assert result.exit_code == 0, result.output
    assert "max_length=10000: K cut in 0" in result.output and "K tokens:" in result.output
