"""SafeKey data: the row schema, loading, rendering with the chat template, and token-span alignment.

A row in the SafeKey reference format::

    {"question": str, "response": "<think>\\n{trace}\\n</think>\\n\\n{answer}",
     "summary_end_idx": int, "next_sentence_end_idx": int, "source": str}

U (the query understanding) is ``response[:summary_end_idx]`` and K (the key sentence) is
``response[summary_end_idx:next_sentence_end_idx]``; both are character offsets (Python string indices). K usually
lies in the trace; it may lie in the answer instead (the reference data has rows with an empty trace
``<think>\n\n</think>\n\n{answer}`` whose U covers the empty think block and whose K is the answer's first
sentence), but it may not straddle ``</think>``. A row is
harmful unless its ``source`` is ``"4o_rewrite"``; an explicit boolean ``unsafe`` field wins over ``source``.
A ``messages`` form is accepted too: a list of chat turns ending with the assistant turn that holds the response,
the offsets then pointing into that last turn's content.

In a data mixture (`load_mixture`), a row with neither offset is plain SFT data (`question`/`response`, `messages` or
TRL's `prompt`/`completion` form): it trains the LM term only, with `key_mask` all zeros, and is counted as LM-only.

Every token span is computed from character offsets of the full rendered text through the fast tokenizer's offset
mapping. **Boundary rule:** a token belongs to the segment (prompt, U, K, rest) that holds its first character. A
token straddling U/K therefore belongs to U when it starts inside U, and K's tokens decode to K's text, possibly
missing a head that shares a token with U's last characters and possibly running on into the characters that share
K's last token.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from .chat_formats import AUTO, ChatFormatError, ResolvedFormat, map_offset, render_turn, resolve_chat_format

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
BENIGN_SOURCE = "4o_rewrite"
# Files read here row by row (anything else is a Hub dataset name)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# The per-example features the SafeKey trainer reads beside `input_ids` and `labels`.
SAFEKEY_FEATURES = ("key_mask", "query_mask", "understanding_span", "prefix_end", "unsafe")


class SafeKeyDataError(ValueError):
    """A row that does not follow the SafeKey format. Names the file, the row (1-based) and the field."""

    def __init__(self, source: str, row: int, field_name: str, message: str):
        self.source = source
        self.row = row
        self.field_name = field_name
        self.message = message
        super().__init__(f"{source}: row {row}, field '{field_name}': {message}")


@dataclass
class SafeKeyExample:
    """One validated row: the prompt as chat messages, the response and the U/K character offsets into it.

    An LM-only example (plain SFT data in a mixture) has no offsets: it trains the LM term only."""

    prompt_messages: list[dict[str, str]]
    response: str
    summary_end_idx: int | None
    next_sentence_end_idx: int | None
    unsafe: bool
    source: str = "<memory>"
    row: int = 0

    @property
    def key_in_answer(self) -> bool:
        """Whether K lies after the reasoning trace, in the answer (as in the reference data's empty-trace rows)."""
        if self.lm_only:
            return False
        trace_end = self.response.find(THINK_CLOSE)
        return 0 <= trace_end < self.next_sentence_end_idx

    @property
    def lm_only(self) -> bool:
        """True for a row without U and K: it trains the LM term only."""
        return self.summary_end_idx is None


@dataclass
class InvalidRowReport:
    """What `skip_invalid=True` left out: a count per field and every error message."""

    errors: list[SafeKeyDataError] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row it repeats)

    @property
    def count(self) -> int:
        return len(self.errors)

    def by_field(self) -> dict[str, int]:
        return dict(Counter(error.field_name for error in self.errors))

    def summary(self, limit: int = 5) -> str:
        lines = [f"{self.count} invalid row(s) skipped, by field: {self.by_field()}"]
        lines += [f"  {error}" for error in self.errors[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        return "\n".join(lines)

    def duplicates_summary(self) -> str:
        """One line on the valid rows that repeat an earlier one (kept, so they count twice in training)."""
        examples = ", ".join(f"row {row} repeats row {first}" for row, first in self.duplicates[:3])
        more = ", ..." if len(self.duplicates) > 3 else ""
        return f"{len(self.duplicates)} duplicate row(s), kept: {examples}{more}"


@dataclass
class FeaturizeStats:
    """Counts from `featurize`: rows in, rows out, and what truncation did."""

    rows: int = 0
    examples: int = 0
    key_truncated: int = 0
    dropped_no_response: int = 0
    lm_only: int = 0  # examples without U/K (plain SFT data in a mixture), kept: they train the LM term only


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _lone_surrogate(value: Any, field_name: str = "<row>") -> tuple[str, str] | None:
    """`(field, message)` for the first string in a row holding a lone surrogate (JSON allows `"\\ud800"`, but it
    is no character: no tokenizer or UTF-8 writer takes it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return field_name, (
                f"a lone surrogate \\u{ord(value[error.start]):04x} at character {error.start}: not valid Unicode text"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(item, key if field_name == "<row>" else field_name)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _lone_surrogate(item, field_name)
            if found:
                return found
    return None


def _checked(source: str, number: int, row: Any) -> Any:
    """The row itself, or a [`SafeKeyDataError`] in its place when it holds text that is not valid Unicode."""
    found = _lone_surrogate(row)
    return SafeKeyDataError(source, number, *found) if found else row


def _not_utf8(source: str, error: UnicodeDecodeError, data: bytes, row: int, where: str) -> SafeKeyDataError:
    return SafeKeyDataError(
        source,
        row,
        "<encoding>",
        f"not UTF-8 text: byte 0x{data[error.start]:02x} at {where} (save the file as UTF-8)",
    )


def read_rows(path_or_name: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield `(row_number, row)` from a `.jsonl`, `.json` or `.parquet` file, or a Hub dataset name.

    Row numbers are 1-based (the line number in a `.jsonl` file). A row that cannot be read (a `.jsonl` line that is
    not JSON or not UTF-8, a string holding a lone surrogate) is yielded as a [`SafeKeyDataError`] in place of the
    row, so that the caller decides whether to raise or to count it.
    """
    path = Path(path_or_name)
    source = str(path_or_name)
    suffix = path.suffix.lower()
    if path.is_dir():
        if suffix in LOCAL_SUFFIXES:
            raise ValueError(f"{source}: is a directory, not a {suffix} file")
    elif suffix in LOCAL_SUFFIXES and not path.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield line_number, _not_utf8(source, error, raw, line_number, f"column {error.start + 1}")
                    continue
                if not line.strip():
                    continue
                try:
                    yield line_number, _checked(source, line_number, json.loads(line))
                except json.JSONDecodeError as error:
                    yield line_number, SafeKeyDataError(source, line_number, "<json>", f"not valid JSON ({error.msg})")
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
            raise _not_utf8(source, error, raw, 0, f"line {line}, column {column}") from None
        if not text.strip():
            return  # an empty file: no rows
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SafeKeyDataError(
                source, 0, "<json>", f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise SafeKeyDataError(source, 0, "<json>", "expected a list of rows (or {'data': [...]})")
        for number, row in enumerate(data, start=1):
            yield number, _checked(source, number, row)
    elif suffix == ".parquet":
        yield from enumerate(Dataset.from_parquet(str(path)), start=1)
    else:
        from datasets import load_dataset

        yield from enumerate(load_dataset(path_or_name, split=split), start=1)


def _require(row: dict, name: str, kind: type | tuple[type, ...], source: str, number: int) -> Any:
    if name not in row or row[name] is None:
        raise SafeKeyDataError(source, number, name, "missing")
    value = row[name]
    # `bool` is an `int` in Python, but never a valid offset
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SafeKeyDataError(source, number, name, f"expected {expected}, got {type(value).__name__}")
    return value


def _prompt_messages(row: dict, source: str, number: int) -> tuple[list[dict[str, str]], str]:
    """The prompt turns and the response, from the `question`/`response` form or the `messages` form."""
    if row.get("messages") is not None and row.get("question") is None:
        messages = _require(row, "messages", list, source, number)
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise SafeKeyDataError(source, number, "messages", "expected a list of {'role', 'content'} turns")
        if messages[-1].get("role") != "assistant":
            raise SafeKeyDataError(source, number, "messages", "the last turn must be the assistant's response")
        if not any(m.get("role") == "user" for m in messages[:-1]):
            raise SafeKeyDataError(source, number, "messages", "no user turn before the response")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return prompt, messages[-1]["content"]
    question = _require(row, "question", str, source, number)
    if not question.strip():
        raise SafeKeyDataError(source, number, "question", "empty")
    response = _require(row, "response", str, source, number)
    return [{"role": "user", "content": question}], response


def _has_offsets(row: dict) -> bool:
    return any(row.get(name) is not None for name in ("summary_end_idx", "next_sentence_end_idx"))


def _turns(value: Any, source: str, number: int, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SafeKeyDataError(source, number, name, "expected a string or a list of {'role', 'content'} turns")
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        raise SafeKeyDataError(source, number, name, "expected a list of {'role', 'content'} turns")
    return [{"role": m.get("role", ""), "content": m["content"]} for m in value]


def validate_lm_only_row(row: Any, source: str, number: int) -> SafeKeyExample:
    """Check a row without U and K (plain SFT data): `question`/`response`, `messages` ending with the assistant's
    turn, or TRL's `prompt`/`completion` (strings, or lists of turns; a string prompt is the user's turn)."""
    if not isinstance(row, dict):
        raise SafeKeyDataError(source, number, "<row>", f"expected a JSON object, got {type(row).__name__}")
    if row.get("prompt") is not None or row.get("completion") is not None:
        prompt_value = _require(row, "prompt", (str, list), source, number)
        completion_value = _require(row, "completion", (str, list), source, number)
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = _turns(prompt_value, source, number, "prompt")
        if isinstance(completion_value, str):
            response = completion_value
        else:
            completion = _turns(completion_value, source, number, "completion")
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise SafeKeyDataError(source, number, "completion", "expected one assistant turn")
            response = completion[0]["content"]
    else:
        prompt, response = _prompt_messages(row, source, number)
    if not response.strip():
        raise SafeKeyDataError(source, number, "completion" if "completion" in row else "response", "empty")
    return SafeKeyExample(prompt, response, None, None, False, source, number)


def validate_row(row: Any, source: str, number: int, allow_lm_only: bool = False) -> SafeKeyExample:
    """Check one row against the SafeKey format; raise [`SafeKeyDataError`] naming the first bad field.

    With `allow_lm_only`, a row with neither offset is plain SFT data ([`validate_lm_only_row`]).
    """
    if not isinstance(row, dict):
        raise SafeKeyDataError(source, number, "<row>", f"expected a JSON object, got {type(row).__name__}")
    found = _lone_surrogate(row)
    if found:
        raise SafeKeyDataError(source, number, *found)
    if allow_lm_only and not _has_offsets(row):
        return validate_lm_only_row(row, source, number)
    prompt, response = _prompt_messages(row, source, number)
    response_field = "messages" if row.get("messages") is not None and row.get("question") is None else "response"
    if not response.startswith(THINK_OPEN) or THINK_CLOSE not in response:
        raise SafeKeyDataError(
            source, number, response_field, "no <think> block: expected '<think>\\n{trace}\\n</think>\\n\\n{answer}'"
        )
    trace_end = response.index(THINK_CLOSE)
    if response.count(OPEN_TAG) > 1 or response.count(CLOSE_TAG) > 1:
        raise SafeKeyDataError(
            source, number, response_field, "a second <think> block: expected one reasoning trace, then the answer"
        )
    summary_end = _require(row, "summary_end_idx", int, source, number)
    key_end = _require(row, "next_sentence_end_idx", int, source, number)
    for name, value in (("summary_end_idx", summary_end), ("next_sentence_end_idx", key_end)):
        if not 0 <= value <= len(response):
            raise SafeKeyDataError(
                source, number, name, f"{value} is out of range for a response of {len(response)} characters"
            )
    if summary_end <= len(THINK_OPEN):
        raise SafeKeyDataError(source, number, "summary_end_idx", f"{summary_end} leaves the understanding U empty")
    if key_end <= summary_end:
        raise SafeKeyDataError(
            source, number, "next_sentence_end_idx", f"{key_end} is not after summary_end_idx ({summary_end})"
        )
    # K may lie in the answer (the reference data has rows with an empty trace, U covering the empty think block and
    # K the answer's first sentence), but no boundary may cut the closing tag and K may not straddle it
    tag_start = trace_end + 1  # THINK_CLOSE is "\n</think>\n\n"
    tag_end = tag_start + len(CLOSE_TAG)
    for name, value in (("summary_end_idx", summary_end), ("next_sentence_end_idx", key_end)):
        if tag_start < value < tag_end:
            raise SafeKeyDataError(source, number, name, f"{value} cuts the {CLOSE_TAG} tag at {tag_start}")
    if summary_end <= tag_start and key_end >= tag_end:
        raise SafeKeyDataError(
            source,
            number,
            "next_sentence_end_idx",
            f"the key sentence K [{summary_end}, {key_end}) spans the {CLOSE_TAG} tag at {tag_start}: K lies in the "
            "trace or in the answer, not across both",
        )
    if not response[summary_end:key_end].strip():
        raise SafeKeyDataError(source, number, "next_sentence_end_idx", "the key sentence K is blank")
    if "unsafe" in row and row["unsafe"] is not None:
        unsafe = _require(row, "unsafe", bool, source, number)
    else:
        unsafe = _require(row, "source", str, source, number) != BENIGN_SOURCE
    return SafeKeyExample(prompt, response, summary_end, key_end, unsafe, source, number)


def load_examples(
    path_or_name: str, split: str = "train", skip_invalid: bool = False
) -> tuple[list[SafeKeyExample], InvalidRowReport]:
    """Read and validate every row of a SafeKey dataset.

    Args:
        path_or_name: A `.jsonl`, `.json` or `.parquet` file, or a Hub dataset name.
        split: The split to load for a Hub dataset.
        skip_invalid: Leave out invalid rows and count them in the report instead of raising on the first.

    Returns:
        The valid examples, and the report of the rows left out.
    """
    examples: list[SafeKeyExample] = []
    report = InvalidRowReport()
    rows_read = 0
    first_seen: dict[str, int] = {}
    for number, row in read_rows(path_or_name, split):
        rows_read += 1
        try:
            if isinstance(row, SafeKeyDataError):
                raise row
            example = validate_row(row, str(path_or_name), number)
        except SafeKeyDataError as error:
            if not skip_invalid:
                raise
            report.errors.append(error)
            continue
        examples.append(example)
        # the same prompt, response, offsets and label again; kept (a repeat weights a row up), but counted
        key = json.dumps(
            [
                example.prompt_messages,
                example.response,
                example.summary_end_idx,
                example.next_sentence_end_idx,
                example.unsafe,
            ]
        )
        if key in first_seen:
            report.duplicates.append((number, first_seen[key]))
        else:
            first_seen[key] = number
    if not rows_read:
        raise ValueError(f"{path_or_name}: no rows (the file is empty or an empty list)")
    if report.count:
        logger.warning(report.summary())
    if report.duplicates:
        logger.warning(report.duplicates_summary())
    return examples, report


# ---------------------------------------------------------------------------------------------------------------------
# Rendering and span alignment


@dataclass
class RenderedExample:
    """The full text of one example and the character boundaries of its segments in it."""

    text: str
    prompt_end: int  # end of the rendered prompt (generation prompt included)
    understanding_end: int  # end of U
    key_end: int  # end of K


def render(
    example: SafeKeyExample, tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO
) -> RenderedExample:
    """Render an example in the format of the tokenizer's chat template, and map U and K into the rendering.

    The family comes from `tokenizer.chat_template` (or is named by `chat_format`, see
    [`~safekey_trl.chat_formats.resolve_chat_format`]); the trace and the answer go where that family's template reads
    them, and the rendered text is what the template renders for the conversation, its prompt part what it renders
    at inference. U's and K's ends, character offsets into the SafeKey response, map into the rendered trace or
    answer by character offsets (a template that strips a trace's or an answer's ends shifts them accordingly).
    """
    resolved = chat_format if isinstance(chat_format, ResolvedFormat) else resolve_chat_format(tokenizer, chat_format)
    response = example.response
    if example.lm_only and not (response.startswith(THINK_OPEN) and THINK_CLOSE in response):
        # Plain SFT data without a reasoning trace: the whole response is the answer, after an empty trace
        response = THINK_OPEN + THINK_CLOSE.lstrip("\n") + response
    close = response.index(THINK_CLOSE)
    trace_bounds = (min(len(THINK_OPEN), close), close)  # `<think>\n</think>\n\n`: an empty trace
    answer_start = close + len(THINK_CLOSE)
    trace, answer = response[trace_bounds[0] : close], response[answer_start:]
    try:
        turn = render_turn(example.prompt_messages, trace, answer, tokenizer, resolved)
    except ChatFormatError as error:
        raise SafeKeyDataError(example.source, example.row, "response", str(error)) from None
    if example.lm_only:  # no U or K: both end where the prompt does
        return RenderedExample(turn.text, turn.prompt_end, turn.prompt_end, turn.prompt_end)
    return RenderedExample(
        text=turn.text,
        prompt_end=turn.prompt_end,
        understanding_end=map_offset(example.summary_end_idx, trace_bounds, answer_start, turn),
        key_end=map_offset(example.next_sentence_end_idx, trace_bounds, answer_start, turn),
    )


def token_spans(token_starts: list[int], rendered: RenderedExample) -> tuple[int, int, int]:
    """Token indices where the response, K and the rest begin: `(prompt_len, key_start, key_end)`.

    Tokens are assigned by the boundary rule: to the segment holding their first character. So U's tokens are
    `[prompt_len, key_start)` and K's are `[key_start, key_end)`.
    """
    prompt_len = bisect.bisect_left(token_starts, rendered.prompt_end)
    key_start = bisect.bisect_left(token_starts, rendered.understanding_end)
    key_end = bisect.bisect_left(token_starts, rendered.key_end)
    return prompt_len, key_start, key_end


@dataclass
class TokenizedExample:
    """An example's tokens and its segments' token boundaries, before any truncation: the prompt is
    `[0, prompt_len)`, U `[prompt_len, key_start)`, K `[key_start, key_end)`, the rest `[key_end, len(input_ids))`."""

    input_ids: list[int]
    prompt_len: int
    key_start: int
    key_end: int


def tokenize_example(
    example: SafeKeyExample, tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO
) -> TokenizedExample:
    """Render and tokenize an example, and place its segments by the boundary rule.

    Raises [`SafeKeyDataError`] when U or K gets no token of its own under this tokenizer.
    """
    rendered = render(example, tokenizer, chat_format)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    prompt_len, key_start, key_end = token_spans(starts, rendered)
    if example.lm_only:
        return TokenizedExample(encoding["input_ids"], prompt_len, prompt_len, prompt_len)
    if key_start == prompt_len:
        raise SafeKeyDataError(
            example.source, example.row, "summary_end_idx", "the understanding U has no token of its own"
        )
    if key_end == key_start:
        raise SafeKeyDataError(
            example.source, example.row, "next_sentence_end_idx", "the key sentence K has no token of its own"
        )
    return TokenizedExample(encoding["input_ids"], prompt_len, key_start, key_end)


def featurize_example(
    example: SafeKeyExample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    chat_format: str | ResolvedFormat = AUTO,
) -> dict[str, Any]:
    """Turn one validated example into the trainer's features.

    Returns a dict with `input_ids`, `labels` (-100 on the prompt), `key_mask` (1 on K's tokens), `query_mask` (0 on
    every prompt token, generation prompt included, 1 after), `understanding_span` (`[start, end)` of U's tokens),
    `prefix_end` (the first K token: the head's prefix path pools `[0, prefix_end)`), and `unsafe`. When K does not
    fit in `max_length`, `key_mask` is all zeros and the spans are `[0, 0]`/`0`: the example trains the LM term only.
    The text is rendered in the format of the tokenizer's chat template family, or of the one `chat_format` names
    (see [`render`]).
    """
    tokenized = tokenize_example(example, tokenizer, chat_format)
    input_ids, prompt_len = tokenized.input_ids, tokenized.prompt_len
    key_start, key_end = tokenized.key_start, tokenized.key_end
    if max_length is not None:
        input_ids = input_ids[:max_length]  # right truncation: keep the start
    length = len(input_ids)
    labels = [-100] * min(prompt_len, length) + input_ids[prompt_len:]
    query_mask = [0] * min(prompt_len, length) + [1] * max(length - prompt_len, 0)
    key_fits = not example.lm_only and key_end <= length
    key_mask = [0] * length
    if key_fits:
        key_mask[key_start:key_end] = [1] * (key_end - key_start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "key_mask": key_mask,
        "query_mask": query_mask,
        "understanding_span": [prompt_len, key_start] if key_fits else [0, 0],
        "prefix_end": key_start if key_fits else 0,
        "unsafe": int(example.unsafe),
    }


FEATURE_COLUMNS = ("input_ids", "labels", *SAFEKEY_FEATURES)
# Per-row bookkeeping columns of the `map` in `featurize`, dropped from its output
_STATUS_COLUMNS = ("error_field", "error_message", "has_response", "has_key")
# The column types `datasets` infers for the features (`input_ids` as int32), fixed so that a batch of error rows,
# with empty lists, cannot change them
_MAP_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        **{name: List(Value("int64")) for name in ("labels", "key_mask", "query_mask", "understanding_span")},
        "prefix_end": Value("int64"),
        "unsafe": Value("int64"),
        "error_field": Value("string"),
        "error_message": Value("string"),
        "has_response": Value("bool"),
        "has_key": Value("bool"),
    }
)


def _example_record(example: SafeKeyExample) -> dict[str, Any]:
    return {
        "prompt_messages": example.prompt_messages,
        "response": example.response,
        "summary_end_idx": example.summary_end_idx,
        "next_sentence_end_idx": example.next_sentence_end_idx,
        "unsafe": example.unsafe,
        "source": example.source,
        "row": example.row,
    }


def _featurize_record(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    chat_format: ResolvedFormat,
) -> dict:
    """The `map` function of `featurize`: one example's features, or the error it raised (in the status columns,
    so that the main process raises or counts it in row order, whatever the number of processes)."""
    example = SafeKeyExample(
        prompt_messages=[{"role": turn["role"], "content": turn["content"]} for turn in record["prompt_messages"]],
        response=record["response"],
        summary_end_idx=record["summary_end_idx"],
        next_sentence_end_idx=record["next_sentence_end_idx"],
        unsafe=record["unsafe"],
        source=record["source"],
        row=record["row"],
    )
    try:
        feature = featurize_example(example, tokenizer, max_length, chat_format)
    except SafeKeyDataError as error:
        empty = {name: [] for name in ("input_ids", "labels", "key_mask", "query_mask", "understanding_span")}
        return {
            **empty,
            "prefix_end": 0,
            "unsafe": 0,
            "error_field": error.field_name,
            "error_message": error.message,
            "has_response": False,
            "has_key": False,
        }
    return {
        **feature,
        "error_field": "",
        "error_message": "",
        "has_response": any(label != -100 for label in feature["labels"]),
        "has_key": any(feature["key_mask"]),
    }


def _features_cache_file(
    records: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, chat_format: ResolvedFormat
) -> str:
    """Where the datasets cache keeps the features of these records: keyed by the records, the tokenizer (its
    vocabulary and chat template included), `max_length`, the chat format and the featurising code itself."""
    from datasets import config
    from datasets.fingerprint import Hasher

    code = [_featurize_record, featurize_example, tokenize_example, render, render_turn]
    key = Hasher.hash([records._fingerprint, *code, tokenizer, max_length, chat_format])
    directory = Path(config.HF_DATASETS_CACHE) / "safekey_features"
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory / f"features-{key}.arrow")


def featurize(
    examples: Iterable[SafeKeyExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    skip_invalid: bool = False,
    report: InvalidRowReport | None = None,
    chat_format: str = AUTO,
    num_proc: int | None = None,
) -> tuple[Dataset, FeaturizeStats]:
    """Featurize examples into a `datasets.Dataset` ready for [`SafeKeySFTTrainer`].

    Runs [`featurize_example`] on every example through `datasets.map`, on `num_proc` processes, and keeps the
    result in the datasets cache (`HF_DATASETS_CACHE/safekey_features`): the same examples, tokenizer and
    `max_length` are featurised once. Examples whose response does not start within `max_length` have nothing to
    train and are dropped; those whose K is cut train the LM term only, as do LM-only examples. These counts are
    logged and returned. A row whose U or K gets no token of its own under this tokenizer raises
    [`SafeKeyDataError`] (the first such row, in order), or is counted in `report` with `skip_invalid=True`.
    """
    examples = list(examples)
    stats = FeaturizeStats(rows=len(examples))
    resolved = resolve_chat_format(tokenizer, chat_format)  # once: an unknown template fails before any row
    if not examples:
        return Dataset.from_dict({name: [] for name in FEATURE_COLUMNS}), stats
    records = Dataset.from_list([_example_record(example) for example in examples])
    mapped = records.map(
        _featurize_record,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "chat_format": resolved},
        remove_columns=records.column_names,
        features=_MAP_FEATURES,
        num_proc=num_proc if num_proc and num_proc > 1 and len(examples) > 1 else None,
        cache_file_name=_features_cache_file(records, tokenizer, max_length, resolved),
        desc="Featurizing",
    )
    status = mapped.select_columns(list(_STATUS_COLUMNS)).to_dict()
    keep = []
    for index, example in enumerate(examples):
        if status["error_field"][index]:
            error = SafeKeyDataError(
                example.source, example.row, status["error_field"][index], status["error_message"][index]
            )
            if not skip_invalid:
                raise error
            if report is not None:
                report.errors.append(error)
            logger.warning("skipped: %s", error)
        elif not status["has_response"][index]:
            stats.dropped_no_response += 1
        else:
            keep.append(index)
            if example.lm_only:
                stats.lm_only += 1
            elif not status["has_key"][index]:
                stats.key_truncated += 1
    stats.examples = len(keep)
    if stats.key_truncated:
        logger.warning(
            "%d of %d examples have their key sentence K cut by max_length=%s: they train the LM term only.",
            stats.key_truncated,
            stats.rows,
            max_length,
        )
    if stats.dropped_no_response:
        logger.warning(
            "%d of %d examples were dropped: their prompt alone fills max_length=%s, leaving no response to train on.",
            stats.dropped_no_response,
            stats.rows,
            max_length,
        )
    dataset = mapped.remove_columns(list(_STATUS_COLUMNS))
    if len(keep) < len(examples):
        dataset = dataset.select(keep)
    return dataset, stats


def load_safekey_dataset(
    path_or_name: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    chat_format: str = AUTO,
    num_proc: int | None = None,
) -> tuple[Dataset, FeaturizeStats, InvalidRowReport]:
    """Load, validate and featurize a SafeKey dataset in one call (`num_proc`: processes featurising)."""
    examples, report = load_examples(path_or_name, split=split, skip_invalid=skip_invalid)
    if not examples:
        raise ValueError(
            f"{path_or_name}: no valid rows to train on" + (f"\n{report.summary()}" if report.count else "")
        )
    dataset, stats = featurize(
        examples,
        tokenizer,
        max_length,
        skip_invalid=skip_invalid,
        report=report,
        chat_format=chat_format,
        num_proc=num_proc,
    )
    if not len(dataset):
        reasons = [f"{stats.dropped_no_response} dropped: the prompt alone fills max_length={max_length}"]
        if report.count:
            reasons.append(f"{report.count} invalid")
        raise ValueError(
            f"{path_or_name}: nothing left to train on: of {stats.rows} valid rows, {'; '.join(reasons)}"
            + (" (raise --max_length)" if stats.dropped_no_response else "")
        )
    return dataset, stats, report
