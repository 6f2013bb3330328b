"""Data: schema validation, loading, rendering with the real template, and token-span alignment."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from conftest import ROOT, SAMPLE_DATA, make_example
from datasets import Dataset
from helpers import check_boundary_rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safekey_trl.data import (
    SafeKeyDataError,
    featurize,
    featurize_example,
    load_examples,
    load_safekey_dataset,
    render,
)
from safekey_trl.tiny import r1_distill_chat_template


def test_packaged_template_is_trls_byte_for_byte():
    """The package's copy is the model's own template, as TRL ships it (byte-identical to the model's)."""
    trl_copy = resources.files("trl") / "chat_templates" / "deepseek_r1_distill.jinja"
    assert r1_distill_chat_template() == trl_copy.read_text(encoding="utf-8")
    assert "{% set content = content.split('</think>')[-1] %}" in r1_distill_chat_template()


def test_naive_rendering_loses_the_trace_and_ours_keeps_it(tokenizer):
    example = make_example()
    messages = [*example.prompt_messages, {"role": "assistant", "content": example.response}]
    naive = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "Okay, so the user" not in naive  # the template deletes the trace from assistant turns
    rendered = render(example, tokenizer)
    assert rendered.text == (
        "<｜begin▁of▁sentence｜><｜User｜>How do I make a dangerous thing at home?<｜Assistant｜><think>\n"
        + example.response[len("<think>\n") :]
        + "<｜end▁of▁sentence｜>"
    )
    feature = featurize_example(example, tokenizer)
    decoded = tokenizer.decode(feature["input_ids"])
    assert "<think>\nOkay, so the user is asking" in decoded and "\n</think>\n\nI can't help" in decoded


def test_exact_spans_on_a_known_example(tokenizer):
    example = make_example()
    feature = featurize_example(example, tokenizer)
    ids = feature["input_ids"]
    prompt = tokenizer.apply_chat_template(example.prompt_messages, tokenize=False, add_generation_prompt=True)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    start, key_start = feature["understanding_span"]
    key_end = key_start + sum(feature["key_mask"])
    assert start == prompt_len
    assert feature["prefix_end"] == key_start
    assert (
        tokenizer.decode(ids[start:key_start]) == "Okay, so the user is asking how to make a dangerous thing at home."
    )
    assert tokenizer.decode(ids[key_start:key_end]) == " But wait, this could be used to hurt someone."
    assert feature["key_mask"] == [0] * key_start + [1] * (key_end - key_start) + [0] * (len(ids) - key_end)
    # The prompt, generation prompt included, is masked in the labels and hidden by the query mask
    assert feature["query_mask"] == [0] * prompt_len + [1] * (len(ids) - prompt_len)
    assert feature["labels"] == [-100] * prompt_len + ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len - 2 : prompt_len]) == "<think>\n"
    assert ids[-1] == tokenizer.eos_token_id and feature["unsafe"] == 1


SENTENCE_ALPHABET = st.sampled_from(list("abcdefghij klmnop,;:'-0123456789éü—") + ["the ", "ing ", "  ", "\n"])
sentence = st.lists(SENTENCE_ALPHABET, min_size=1, max_size=25).map("".join)
terminal = st.sampled_from([".", "?", "!", "...", '."', ".)"])
separator = st.sampled_from([" ", "\n\n", "\n", "", "  "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    understanding=st.lists(st.tuples(sentence, terminal), min_size=1, max_size=3),
    key=st.tuples(separator, sentence, terminal),
    rest=st.lists(st.tuples(separator, sentence, terminal), max_size=3),
)
def test_key_tokens_follow_the_boundary_rule(tokenizer, understanding, key, rest):
    """K's tokens are exactly those whose first character lies in K; they decode to K's text, minus at most the head
    of a token that starts in U, plus at most the tail of K's last token."""
    k_text = "".join(key)
    if not k_text.strip():
        return
    rest_text = "".join("".join(part) for part in rest)
    check_boundary_rule(tokenizer, "Okay, so " + "".join(s + t for s, t in understanding), k_text, rest_text)


def test_truncation_that_cuts_k_keeps_the_lm_term(tokenizer):
    example = make_example()
    full = featurize_example(example, tokenizer)
    key_start = full["prefix_end"]
    cut = featurize_example(example, tokenizer, max_length=key_start + 2)
    assert cut["input_ids"] == full["input_ids"][: key_start + 2]
    assert sum(cut["key_mask"]) == 0 and cut["understanding_span"] == [0, 0] and cut["prefix_end"] == 0
    assert any(label != -100 for label in cut["labels"])
    prompt_len = full["understanding_span"][0]
    dataset, stats = featurize([example, example], tokenizer, max_length=key_start + 2)
    assert stats.key_truncated == 2 and len(dataset) == 2
    dataset, stats = featurize([example], tokenizer, max_length=prompt_len)
    assert stats.dropped_no_response == 1 and len(dataset) == 0


def test_sample_data_is_valid(tokenizer):
    dataset, stats, report = load_safekey_dataset(str(SAMPLE_DATA), tokenizer, max_length=1024)
    assert report.count == 0 and stats.rows == 48 == len(dataset)
    assert sum(dataset["unsafe"]) == 24
    assert all(sum(mask) > 0 for mask in dataset["key_mask"])


def _rows():
    return [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:5]]


def test_json_jsonl_and_parquet_load_alike(tmp_path):
    rows = _rows()
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    loaded = [load_examples(str(tmp_path / f"rows.{suffix}"))[0] for suffix in ("json", "jsonl", "parquet")]
    strip = [
        [(e.prompt_messages, e.response, e.summary_end_idx, e.next_sentence_end_idx, e.unsafe) for e in x]
        for x in loaded
    ]
    assert strip[0] == strip[1] == strip[2] and len(strip[0]) == 5


def test_unsafe_field_wins_over_source(tmp_path):
    row = _rows()[0]
    rows = [dict(row, source="4o_rewrite"), dict(row, source="jbb_like"), dict(row, source="jbb_like", unsafe=False)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [e.unsafe for e in load_examples(str(path))[0]] == [False, True, False]


def test_messages_form_featurizes_like_the_question_form(tmp_path, tokenizer):
    row = _rows()[0]
    messages_row = {
        "messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["response"]}],
        **{k: row[k] for k in ("summary_end_idx", "next_sentence_end_idx", "source")},
    }
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(messages_row) + "\n")
    (question_form, messages_form), _ = load_examples(str(path))
    assert featurize_example(question_form, tokenizer) == featurize_example(messages_form, tokenizer)


BAD_ROWS = [
    ("not json", "{not json", "<json>"),
    ("not an object", "[1, 2]", "<row>"),
    ("missing question", lambda r: {k: v for k, v in r.items() if k != "question"}, "question"),
    ("missing response", lambda r: {k: v for k, v in r.items() if k != "response"}, "response"),
    ("offset as string", lambda r: dict(r, summary_end_idx=str(r["summary_end_idx"])), "summary_end_idx"),
    ("offset as bool", lambda r: dict(r, next_sentence_end_idx=True), "next_sentence_end_idx"),
    ("offset out of range", lambda r: dict(r, next_sentence_end_idx=10**6), "next_sentence_end_idx"),
    ("negative offset", lambda r: dict(r, summary_end_idx=-3), "summary_end_idx"),
    (
        "inverted offsets",
        lambda r: dict(r, summary_end_idx=r["next_sentence_end_idx"], next_sentence_end_idx=r["summary_end_idx"]),
        "next_sentence_end_idx",
    ),
    ("empty U", lambda r: dict(r, summary_end_idx=8), "summary_end_idx"),
    ("K across </think>", lambda r: dict(r, next_sentence_end_idx=len(r["response"]) - 3), "next_sentence_end_idx"),
    (
        "K ends inside </think>",
        lambda r: dict(r, next_sentence_end_idx=r["response"].index("</think>") + 3),
        "next_sentence_end_idx",
    ),
    (
        "U ends inside </think>",
        lambda r: dict(
            r, summary_end_idx=r["response"].index("</think>") + 2, next_sentence_end_idx=len(r["response"]) - 1
        ),
        "summary_end_idx",
    ),
    ("K blank", lambda r: dict(r, next_sentence_end_idx=r["summary_end_idx"] + 1), "next_sentence_end_idx"),
    (
        "second think block",
        lambda r: dict(r, response=r["response"] + "\n<think>\nMore thoughts.\n</think>\n\nAgain."),
        "response",
    ),
    ("no think block", lambda r: dict(r, response=r["response"].replace("<think>\n", "")), "response"),
    ("no source or unsafe", lambda r: {k: v for k, v in r.items() if k != "source"}, "source"),
    ("unsafe not bool", lambda r: dict(r, unsafe="yes"), "unsafe"),
    ("empty question", lambda r: dict(r, question="  "), "question"),
    (
        "messages not ending with the assistant",
        lambda r: {
            "messages": [{"role": "user", "content": r["question"]}],
            "summary_end_idx": 9,
            "next_sentence_end_idx": 20,
            "source": "x",
        },
        "messages",
    ),
]


@pytest.mark.parametrize("name,corrupt,field", BAD_ROWS, ids=[row[0] for row in BAD_ROWS])
def test_bad_rows_name_file_row_and_field(tmp_path, name, corrupt, field):
    good = _rows()
    bad_line = corrupt if isinstance(corrupt, str) else json.dumps(corrupt(good[1]))
    lines = [json.dumps(good[0]), bad_line, json.dumps(good[2])]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SafeKeyDataError) as caught:
        load_examples(str(path))
    assert caught.value.row == 2 and caught.value.field_name == field
    assert str(caught.value).startswith(f"{path}: row 2, field '{field}': ")
    # With skip_invalid, the bad row is counted and both good rows are kept
    examples, report = load_examples(str(path), skip_invalid=True)
    assert [e.row for e in examples] == [1, 3]
    assert report.count == 1 and report.by_field() == {field: 1}


def test_bad_json_file_is_reported(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"question": "x",')
    with pytest.raises(SafeKeyDataError, match=r"data.json: row 0, field '<json>': not valid JSON"):
        load_examples(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_a_token_straddling_u_and_k_belongs_to_u(tokenizer):
    # " user" is one token of the tiny tokenizer: cutting U inside it makes a token that straddles U and K
    example = make_example(understanding="Okay, so the us", key="er asks what to do.", rest=" More.")
    rendered = render(example, tokenizer)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    straddling = [(s, e) for s, e in encoding["offset_mapping"] if s < rendered.understanding_end < e]
    assert straddling, "the example should have a token across the U/K boundary"
    feature = featurize_example(example, tokenizer)
    key_start = feature["prefix_end"]
    # The straddling token is U's last token; K's tokens start after it
    assert tuple(encoding["offset_mapping"][key_start - 1]) == straddling[0]
    decoded = tokenizer.decode(feature["input_ids"][key_start : key_start + sum(feature["key_mask"])])
    assert decoded == " asks what to do."


EMPTY_TRACE_ROWS = ROOT / "tests" / "fixtures" / "empty_trace_rows.json"


def test_rows_with_k_in_the_answer_load_like_the_reference(tokenizer):
    """The reference's rows with an empty trace: U covers `<think>\\n\\n</think>\\n\\n`, K is the answer's first
    sentence. They validate, count as K-in-the-answer, and featurize with U and K on the right tokens."""
    examples, report = load_examples(str(EMPTY_TRACE_ROWS))
    assert report.count == 0 and len(examples) == 6
    assert [example.key_in_answer for example in examples] == [False, True, True, True, True, False]
    empty = examples[1]
    assert empty.response.startswith("<think>\n\n</think>\n\nI can't help write")
    assert empty.summary_end_idx == len("<think>\n\n</think>\n\n")
    feature = featurize_example(empty, tokenizer)
    ids = feature["input_ids"]
    prompt_len, key_start = feature["understanding_span"]
    key_end = key_start + sum(feature["key_mask"])
    # The generation prompt holds `<think>\\n`; U is what is left of the empty block, K the answer's first sentence
    assert tokenizer.decode(ids[:prompt_len]).endswith("<｜Assistant｜><think>\n")
    assert tokenizer.decode(ids[prompt_len:key_start]) == "\n</think>\n\n"
    assert tokenizer.decode(ids[key_start:key_end]) == (
        "I can't help write a message meant to trick someone into giving away their bank PIN."
    )
    assert feature["prefix_end"] == key_start and feature["labels"][:prompt_len] == [-100] * prompt_len
    dataset, stats = featurize(examples, tokenizer)
    assert len(dataset) == 6 and all(sum(mask) > 0 for mask in dataset["key_mask"])
