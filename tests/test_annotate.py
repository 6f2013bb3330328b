"""Finding U and K: sentence splitting, the heuristic, the LLM client against a loopback server, the CLI."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from conftest import SAMPLE_DATA
from loopback import ChatCompletionsServer, completion
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.data import SafeKeyDataError, load_examples
from safekey_trl.data.annotate import (
    AnnotationError,
    AnswerCache,
    LLMReplyError,
    LLMSettings,
    annotate_file,
    annotate_rows,
    cache_key,
    heuristic_agreement,
    heuristic_annotation,
    key_sentence_of,
    parse_key_sentence,
    resolve_llm_settings,
    sidecar_path,
    split_sentences,
)

runner = CliRunner()


def sentences(text: str) -> list[str]:
    return [text[start:end] for start, end in split_sentences(text)]


def response_of(*trace_sentences: str, answer: str = "I can't help with that.") -> str:
    return "<think>\n" + "".join(trace_sentences) + "\n</think>\n\n" + answer


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Sentence splitting


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One here. Two there! Three? Four", ["One here.", " Two there!", " Three?", " Four"]),
        # abbreviations, with a capital after them too
        (
            "Use e.g. Python here. Dr. Smith agrees, i.e. The Boss. Then stop.",
            ["Use e.g. Python here.", " Dr. Smith agrees, i.e. The Boss.", " Then stop."],
        ),
        # decimals, domains and a version number never split
        (
            "It costs 3.5 dollars at shop.example.com today. Version 2.0.1 works.",
            ["It costs 3.5 dollars at shop.example.com today.", " Version 2.0.1 works."],
        ),
        # an ellipsis ends a sentence before a capital, not before a lower-case word
        ("Hmm... let me think. Wait... That is odd.", ["Hmm... let me think.", " Wait...", " That is odd."]),
        ("Hmm… So that's it.", ["Hmm…", " So that's it."]),
        # closing quotes and brackets belong to the sentence they close
        (
            'He said "stop." Then he left. (It was late.) Fine.',
            ['He said "stop."', " Then he left.", " (It was late.)", " Fine."],
        ),
        ("Is it ok?! Yes.", ["Is it ok?!", " Yes."]),
        # numbered and bulleted lists: every item is a sentence, "1." is no sentence end
        (
            "Steps:\n1. Open the router.\n2) Reset it\n- a bullet\n* another one\nAfter the list.",
            [
                "Steps:",
                "\n1. Open the router.",
                "\n2) Reset it",
                "\n- a bullet",
                "\n* another one",
                "\nAfter the list.",
            ],
        ),
        # paragraphs end a sentence without punctuation; a single line break inside a sentence is a hard wrap
        ("A heading without a period\n\nBody text. More.", ["A heading without a period", "\n\nBody text.", " More."]),
        ("Wrapped line\ncontinues here. Next.", ["Wrapped line\ncontinues here.", " Next."]),
        # a fenced code block is one unit; inline code never splits
        (
            "Here is code:\n```python\nx = 1. Y = 2\nprint(x.y)\n```\nThen it runs. Call `a.b(). C` now.",
            [
                "Here is code:",
                "\n```python\nx = 1. Y = 2\nprint(x.y)\n```",
                "\nThen it runs.",
                " Call `a.b(). C` now.",
            ],
        ),
        ("No. 5 on the list is approx. 3 cups. Next.", ["No. 5 on the list is approx. 3 cups.", " Next."]),
        ("Trailing space. \n\n", ["Trailing space."]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert sentences(text) == expected


def test_split_sentences_spans_are_contiguous_and_cover_the_text():
    text = "Okay, so the user asks. They want x.\n\nBut wait, no. 1. Done\n```\ncode\n```\nEnd.  "
    spans = split_sentences(text)
    assert spans[0][0] == 0
    assert all(previous[1] == current[0] for previous, current in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == len(text.rstrip())


# ---------------------------------------------------------------------------------------------------------------------
# The heuristic: exact offsets on hand-written traces


def test_heuristic_takes_the_restatement_as_u_and_the_next_sentence_as_k():
    u = "Okay, so the user is asking how to pick a lock, e.g. on their own shed."
    k = "\n\nBut wait, it could be someone else's shed."
    response = response_of(u, k, " I should ask.")
    annotation = heuristic_annotation(response)
    assert annotation.summary_end_idx == len("<think>\n" + u)
    assert annotation.next_sentence_end_idx == len("<think>\n" + u + k)
    assert response[annotation.summary_end_idx : annotation.next_sentence_end_idx] == k  # whitespace before K is K's
    assert (annotation.key_sentence, annotation.sentences, annotation.unsure) == (2, 3, False)


def test_heuristic_extends_u_over_sentences_that_continue_the_restatement():
    u = "Okay, the user wants 2.5 kg of fertilizer for a bomb. They say it is for a film, and they mention a deadline."
    k = " Hmm, that's a request for explosive help."
    response = response_of(u, k, " No.")
    annotation = heuristic_annotation(response)
    assert response[: annotation.summary_end_idx] == "<think>\n" + u
    assert response[annotation.summary_end_idx : annotation.next_sentence_end_idx] == k
    assert annotation.key_sentence == 3 and not annotation.unsure


def test_heuristic_treats_a_reported_request_as_restatement_but_stops_at_a_reaction():
    u1 = "Okay, so the user is asking: what's the best way to kill a Python process?"
    u2 = " Ctrl+C isn't working, so they want a clean way to stop it."
    k = " This is about ending a program, not harm."
    annotation = heuristic_annotation(response_of(u1, u2, k, " Use SIGTERM."))
    assert annotation.key_sentence == 3
    # "This ..." opens a reaction even though it would otherwise continue
    annotation = heuristic_annotation(response_of(u1, k, u2))
    assert annotation.key_sentence == 2


def test_heuristic_joins_a_bare_interjection_to_the_restatement():
    response = response_of("Okay.", " The user wants a cake recipe.", " That's easy.", " Flour first.")
    annotation = heuristic_annotation(response)
    assert response[: annotation.summary_end_idx] == "<think>\nOkay. The user wants a cake recipe."
    assert annotation.key_sentence == 3


def test_heuristic_flags_an_opening_that_is_no_restatement():
    response = response_of("Photosynthesis turns light into sugar.", " Chlorophyll absorbs red light.", " Fine.")
    annotation = heuristic_annotation(response)
    assert annotation.unsure and "restatement" in annotation.reasons[0]
    assert annotation.key_sentence == 2  # still a valid split, for a human or the llm method to check


def test_heuristic_caps_u_at_three_sentences_and_flags_it():
    parts = ["Okay, the user wants help.", " They say a.", " They say b.", " They say c.", " They say d."]
    annotation = heuristic_annotation(response_of(*parts))
    assert annotation.key_sentence == 4 and annotation.unsure
    assert any("cap" in reason for reason in annotation.reasons)


def test_heuristic_always_leaves_a_sentence_for_k():
    annotation = heuristic_annotation(response_of("Okay, the user wants help.", " They say a."))
    assert annotation.key_sentence == 2 and annotation.sentences == 2


def test_heuristic_splits_a_one_sentence_trace_at_a_clause_and_is_unsure():
    u = "Okay, so the user wants a poison,"
    k = " but I won't help with that."
    response = response_of(u + k)
    annotation = heuristic_annotation(response)
    assert response[: annotation.summary_end_idx] == "<think>\n" + u
    assert response[annotation.summary_end_idx : annotation.next_sentence_end_idx] == k
    assert annotation.unsure and "one-sentence" in annotation.reasons[0]


def test_heuristic_fails_a_one_sentence_trace_without_a_clause_and_an_empty_trace():
    with pytest.raises(AnnotationError, match="single sentence"):
        heuristic_annotation(response_of("No way."))
    with pytest.raises(AnnotationError, match="empty"):
        heuristic_annotation(response_of("   "))


def test_heuristic_handles_lists_and_code_in_k():
    u = "Okay, the user wants to sort a list in Python."
    k = "\n```python\nxs.sort()\n```"
    response = response_of(u, k, "\nThat sorts in place.")
    annotation = heuristic_annotation(response)
    assert response[annotation.summary_end_idx : annotation.next_sentence_end_idx] == k
    k = "\n1. Call sorted(xs)."
    response = response_of(u + "\nOptions:", k, "\n2. Or xs.sort().")
    assert heuristic_annotation(response).key_sentence == 2  # "...Python." | "\nOptions:" is K


def test_key_sentence_of_maps_an_offset_to_its_sentence():
    response = response_of("A is here.", " B is there.", " C too.")
    assert key_sentence_of(response, len("<think>\nA is here. B is there.")) == 2
    assert key_sentence_of(response, len(response)) is None


def test_heuristic_matches_every_hand_annotation_of_the_sample():
    """The number recorded in docs/annotation.md; a change to the rule that loses a row fails here."""
    agreement = heuristic_agreement(str(SAMPLE_DATA))
    assert agreement.rows == 48
    assert agreement.exact == 48, agreement.summary()
    assert agreement.within_one == 48 and agreement.unsure == 0


# ---------------------------------------------------------------------------------------------------------------------
# annotate_file: the output validates, every field is kept, failures are reported


def test_annotate_file_output_validates_and_keeps_every_field(tmp_path):
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()]
    stripped = [{k: v for k, v in row.items() if not k.endswith("_idx")} | {"extra": i} for i, row in enumerate(rows)]
    source = tmp_path / "in.jsonl"
    write_jsonl(source, stripped)
    out = tmp_path / "out.jsonl"
    report = annotate_file(str(source), str(out))
    assert (report.rows, report.annotated, report.unsure, report.failed) == (48, 48, 0, [])
    written = read_jsonl(out)
    for before, after, original in zip(stripped, written, rows, strict=True):
        assert {k: after[k] for k in before} == before
        assert (after["summary_end_idx"], after["next_sentence_end_idx"]) == (
            original["summary_end_idx"],
            original["next_sentence_end_idx"],
        )
        assert after["annotation"]["method"] == "heuristic" and "previous" not in after["annotation"]
    examples, invalid = load_examples(str(out))
    assert len(examples) == 48 and invalid.count == 0
    assert not sidecar_path(out, "failed").exists()


def test_annotate_records_previous_offsets_and_handles_messages_rows(tmp_path):
    response = response_of("Okay, the user wants a cake.", " That's easy.", " Flour.")
    turns = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Cake?"}]
    rows = [
        {"question": "Cake?", "response": response, "source": "4o_rewrite"} | {"summary_end_idx": 9},
        {"messages": [*turns, {"role": "assistant", "content": response}], "unsafe": False},
    ]
    annotated, failed, report = annotate_rows(enumerate(rows, start=1))
    assert failed == [] and report.annotated == 2
    assert annotated[0]["annotation"]["previous"] == [9, None]
    assert annotated[1]["messages"] == rows[1]["messages"]
    assert (
        annotated[0]["summary_end_idx"]
        == annotated[1]["summary_end_idx"]
        == len("<think>\nOkay, the user wants a cake.")
    )
    out = tmp_path / "out.json"
    from safekey_trl.data.annotate import write_rows

    write_rows(out, annotated)
    assert len(load_examples(str(out))[0]) == 2


def test_annotate_stops_on_a_malformed_row_naming_file_row_and_field(tmp_path):
    source = tmp_path / "in.jsonl"
    good = {"question": "q", "response": response_of("Okay, the user asks.", " Fine."), "source": "x"}
    source.write_text(json.dumps(good) + "\n" + json.dumps({"question": "q", "response": "no think"}) + "\n{oops\n")
    with pytest.raises(SafeKeyDataError) as raised:
        annotate_file(str(source), str(tmp_path / "out.jsonl"))
    assert (raised.value.row, raised.value.field_name) == (2, "response")
    assert str(source) in str(raised.value)
    report = annotate_file(str(source), str(tmp_path / "out.jsonl"), skip_invalid=True)
    assert report.annotated == 1 and [number for number, _ in report.failed] == [2, 3]
    failed = read_jsonl(tmp_path / "out.failed.jsonl")
    assert [row["annotation_error"]["row"] for row in failed] == [2, 3]
    assert failed[0]["question"] == "q" and "<think>" in failed[0]["annotation_error"]["reason"]


def test_annotate_reports_unlabelled_rows(tmp_path):
    rows = [{"question": "q", "response": response_of("Okay, the user asks.", " Fine.")}]
    _, _, report = annotate_rows(enumerate(rows, start=1))
    assert report.unlabelled == 1 and "neither 'source' nor 'unsafe'" in report.summary()


# ---------------------------------------------------------------------------------------------------------------------
# The LLM method against a loopback OpenAI-compatible server


class FakeLLM(ChatCompletionsServer):
    """A chat-completions server whose behaviour for a row is picked by a tag in the question ("[tag:NAME]"); it
    counts requests per tag."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def respond(self, body: dict) -> tuple[float, int, bytes]:
        prompt = body["messages"][-1]["content"]
        tag = re.search(r"\[tag:(\w+)\]", prompt).group(1)
        self.counts[tag] += 1
        status, payload, delay = self.behave(tag, self.counts[tag], prompt)
        return delay, status, payload

    reply = staticmethod(completion)

    def behave(self, tag: str, attempt: int, prompt: str) -> tuple[int, bytes, float]:
        answer = self.reply("2")
        if tag == "good":
            return 200, answer, 0
        if tag == "held":  # long enough for requests to overlap
            return 200, answer, 0.1
        if tag == "three":  # answers with some noise around the number
            return 200, self.reply("<think>the restatement spans 2 sentences</think>Sentence 3"), 0
        if tag == "notjson":  # garbage first, then a good answer
            return (200, b"<html>oops</html>", 0) if attempt == 1 else (200, answer, 0)
        if tag == "nochoices":
            return 200, json.dumps({"error": "overloaded"}).encode(), 0
        if tag == "outofrange":
            return 200, self.reply("17"), 0
        if tag == "slow":  # past the client's timeout once, then quick
            return (200, answer, 4.0) if attempt == 1 else (200, answer, 0)
        if tag == "flaky":  # a transient server error, then a good answer
            return (503, b"{}", 0) if attempt == 1 else (200, answer, 0)
        if tag == "denied":
            return 401, b'{"error": "bad key"}', 0
        if tag == "down":  # fails while the test says so
            return (500, b"{}", 0) if self.down else (200, answer, 0)
        raise AssertionError(tag)

    down = True


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


def settings_for(server: FakeLLM, **overrides) -> LLMSettings:
    # A generous timeout: on a busy 2-core CI machine a quick reply can take a while; the slow-reply test sets its own
    values = dict(base_url=server.url, model="fake-model", api_key="sk-test", timeout=5.0, max_retries=2, backoff=0.01)
    values.update(overrides)
    return LLMSettings(**values)


def tagged_rows(*tags: str) -> list[dict]:
    def trace(i: int) -> tuple[str, ...]:
        return (f"Okay, the user asks about thing {i}.", " It has a second sentence.", " And a third one.")

    return [
        {"id": i, "question": f"[tag:{tag}] question {i}", "response": response_of(*trace(i)), "source": "x"}
        for i, tag in enumerate(tags)
    ]


def test_llm_annotates_over_real_http_and_the_output_validates(llm, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = tagged_rows("good", "good", "three", "good")
    write_jsonl(source, rows)
    report = annotate_file(str(source), str(out), "llm", settings_for(llm, concurrency=3))
    assert (report.annotated, report.failed, report.requests, report.cached) == (4, [], 4, 0)
    written = read_jsonl(out)
    assert [row["annotation"]["key_sentence"] for row in written] == [2, 2, 3, 2]
    assert written[0]["annotation"].items() >= {"method": "llm", "model": "fake-model", "cached": False}.items()
    assert [row["id"] for row in written] == [0, 1, 2, 3]  # input order, whatever order the answers came in
    assert len(load_examples(str(out))[0]) == 4
    # Requests run concurrently: pick row 0's by its question, not by arrival order
    request = next(r for r in llm.requests if "[tag:good] question 0\n" in r["body"]["messages"][-1]["content"])
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "fake-model"
    prompt = request["body"]["messages"][-1]["content"]
    assert "[1] Okay, the user asks about thing 0." in prompt and "[3] And a third one." in prompt


def test_llm_keeps_to_its_concurrency_limit(llm):
    rows = tagged_rows(*["held"] * 6)
    annotated, failed, _ = annotate_rows(enumerate(rows, 1), "llm", settings=settings_for(llm, concurrency=2))
    assert len(annotated) == 6 and failed == []
    assert llm.max_in_flight == 2


def test_llm_retries_malformed_slow_and_failing_replies_and_reports_what_it_could_not_do(llm, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    tags = ("notjson", "nochoices", "outofrange", "slow", "flaky", "denied")
    write_jsonl(source, tagged_rows(*tags))
    started = time.monotonic()
    report = annotate_file(str(source), str(out), "llm", settings_for(llm, concurrency=4, timeout=1.0))
    assert time.monotonic() - started < 10
    assert [row["id"] for row in read_jsonl(out)] == [0, 3, 4]  # notjson, slow, flaky: retried into an answer
    assert [row["annotation"]["attempts"] for row in read_jsonl(out)] == [2, 2, 2]
    failed = read_jsonl(sidecar_path(out, "failed"))
    assert [row["id"] for row in failed] == [1, 2, 5]
    reasons = {row["id"]: row["annotation_error"]["reason"] for row in failed}
    assert "no choices" in reasons[1] and "out of range" in reasons[2] and "HTTP 401" in reasons[5]
    # malformed replies are retried up to max_retries (2) times; a 401 is not retried
    assert (llm.counts["nochoices"], llm.counts["outofrange"], llm.counts["denied"]) == (3, 3, 1)
    assert (llm.counts["notjson"], llm.counts["slow"], llm.counts["flaky"]) == (2, 2, 2)
    assert [number for number, _ in report.failed] == [2, 3, 6]
    # every request sent counts, the failed ones too: 13 in all, of which 3 got the answer
    assert (report.requests, report.failed_requests) == (sum(llm.counts.values()), 10) == (13, 10)


def test_llm_counts_the_requests_it_sent_when_all_of_them_failed(llm, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, tagged_rows(*["down"] * 4))
    report = annotate_file(str(source), str(out), "llm", settings_for(llm, max_retries=1))
    assert (report.annotated, len(report.failed)) == (0, 4)
    assert (report.requests, report.failed_requests) == (llm.counts["down"], 8) == (8, 8)
    assert "requests sent: 8, failed: 8" in report.summary()


def test_llm_resumes_from_its_cache_and_skips_a_torn_line(llm, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, tagged_rows("good", "down", "three"))
    settings = settings_for(llm, max_retries=0)
    first = annotate_file(str(source), str(out), "llm", settings)
    assert first.annotated == 2 and [number for number, _ in first.failed] == [2]
    assert sidecar_path(out, "failed").is_file()
    cache_file = sidecar_path(out, "cache")
    assert len(AnswerCache(cache_file)) == 2
    with cache_file.open("a") as handle:
        handle.write('{"key": "abc", "key_sent')  # an interrupted write
    llm.down = False
    before = sum(llm.counts.values())
    second = annotate_file(str(source), str(out), "llm", settings)
    assert sum(llm.counts.values()) - before == 1  # only the row that failed is asked again
    assert (second.annotated, second.cached, second.failed) == (3, 2, [])
    assert not sidecar_path(out, "failed").exists()
    assert [row["annotation"]["key_sentence"] for row in read_jsonl(out)] == [2, 2, 3]
    third = annotate_file(str(source), str(out), "llm", settings)
    assert (third.cached, third.requests) == (3, 0)
    # another model does not reuse these answers
    assert cache_key("fake-model", "trace", "q") != cache_key("other-model", "trace", "q")
    assert cache_key("fake-model", "trace", "q") != cache_key("fake-model", "trace", "another question")


def test_llm_fails_a_one_sentence_trace_without_a_request(llm):
    rows = [{"question": "[tag:good] q", "response": response_of("Only one sentence here."), "source": "x"}]
    annotated, failed, _ = annotate_rows(enumerate(rows, 1), "llm", settings=settings_for(llm))
    assert annotated == [] and "at least two" in failed[0]["annotation_error"]["reason"]
    assert sum(llm.counts.values()) == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [("3", 3), (" Sentence 3.", 3), ('{"key_sentence": 4}', 4), ("[2]", 2), ("<think>1 or 2?</think>\n2", 2)],
)
def test_parse_key_sentence(content, expected):
    assert parse_key_sentence(content, 5) == expected


@pytest.mark.parametrize("content", ["", "two", "2 or 3", "1", "6"])
def test_parse_key_sentence_rejects(content):
    with pytest.raises(LLMReplyError):
        parse_key_sentence(content, 5)


def test_llm_settings_come_from_options_then_safekey_then_openai_env(monkeypatch):
    for name in (
        "SAFEKEY_LLM_BASE_URL",
        "SAFEKEY_LLM_MODEL",
        "SAFEKEY_LLM_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="--base-url or SAFEKEY_LLM_BASE_URL and --model"):
        resolve_llm_settings()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("SAFEKEY_LLM_MODEL", "m")
    settings = resolve_llm_settings(timeout=5)
    assert (settings.base_url, settings.model, settings.api_key, settings.timeout) == (
        "http://openai/v1",
        "m",
        "sk-openai",
        5,
    )
    monkeypatch.setenv("SAFEKEY_LLM_BASE_URL", "http://mine")
    monkeypatch.setenv("SAFEKEY_LLM_API_KEY", "sk-mine")
    assert resolve_llm_settings().base_url == "http://mine" and resolve_llm_settings().api_key == "sk-mine"
    assert resolve_llm_settings(base_url="http://flag", model="x").base_url == "http://flag"


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_annotate_heuristic_and_llm(llm, tmp_path, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, tagged_rows("good", "denied"))
    result = runner.invoke(app, ["data", "annotate", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert "2 annotated with the heuristic method" in result.output and "unsure: 0" in result.output
    monkeypatch.setenv("SAFEKEY_LLM_BASE_URL", llm.url)
    monkeypatch.setenv("SAFEKEY_LLM_MODEL", "fake-model")
    result = runner.invoke(app, ["data", "annotate", str(source), str(out), "--method", "llm", "--timeout", "2"])
    assert result.exit_code == 1, result.output
    assert "row 2: HTTP 401" in result.output and "out.failed.jsonl" in result.output
    result = runner.invoke(app, ["data", "annotate", str(source), str(out), "--method", "nope"])
    assert result.exit_code == 2


def test_cli_annotate_names_the_bad_row(tmp_path):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"question": "q"}])
    result = runner.invoke(app, ["data", "annotate", str(source), str(tmp_path / "out.jsonl")])
    assert result.exit_code == 1
    assert f"{source}: row 1, field 'response': missing" in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--concurrency", "0"], "error: --concurrency must be at least 1, got 0"),
        (["--retries", "-1"], "error: --retries must be at least 0, got -1"),
        (["--timeout", "0"], "error: --timeout must be a number of seconds > 0, got 0.0"),
    ],
)
def test_cli_annotate_refuses_bad_options_by_name(tmp_path, options, message):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, tagged_rows("good"))
    result = runner.invoke(app, ["data", "annotate", str(source), str(tmp_path / "out.jsonl"), *options])
    assert result.exit_code == 2 and result.output.strip() == message


class HangsAfterThree(ChatCompletionsServer):
    """Answers the first three requests, then never answers (until `release`)."""

    def __init__(self):
        super().__init__()
        self.answered = 0
        self.hang = True

    def respond(self, body: dict) -> tuple[float, int, bytes]:
        self.answered += 1
        return (60.0 if self.hang and self.answered > 3 else 0.0), 200, completion("2")


def test_ctrl_c_during_llm_annotate_stops_at_once_and_the_rerun_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, tagged_rows(*["good"] * 8))
    cli = str(Path(sys.executable).parent / "safekey-trl")
    with HangsAfterThree() as server:
        command = [cli, "data", "annotate", str(source), str(out), "--method", "llm", "--base_url", server.url]
        command += ["--model", "m", "--concurrency", "1"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cache = tmp_path / "out.cache.jsonl"
        deadline = time.monotonic() + 60
        while not (cache.is_file() and len(cache.read_text().splitlines()) == 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # the fourth request is in flight, and hangs
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("annotate kept running after Ctrl-C")
        assert time.monotonic() - interrupted < 5
        assert process.returncode == 130, output
        assert f"interrupted: 3 of 8 rows annotated; nothing written to {out}" in output.replace("\n", "")
        assert f"kept in {cache}: run the same command again to resume" in output.replace("\n", "")
        assert not out.exists()
        server.hang = False
        sent = server.answered
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, result.output
        assert server.answered - sent == 5 and "from the cache: 3" in result.output
