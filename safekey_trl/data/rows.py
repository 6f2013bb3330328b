"""The SafeKey row schema: what a row holds, how it is checked, and the errors that name a bad one.

A row in the SafeKey reference format::

    {"question": str, "response": "<think>\\n{trace}\\n</think>\\n\\n{answer}",
     "summary_end_idx": int, "next_sentence_end_idx": int, "source": str}

U (the query understanding) is ``response[:summary_end_idx]`` and K (the key sentence) is
``response[summary_end_idx:next_sentence_end_idx]``; both are character offsets (Python string indices). K usually
lies in the trace; it may lie in the answer instead (the reference data has rows with an empty trace
``<think>\n\n</think>\n\n{answer}`` whose U covers the empty think block and whose K is the answer's first
sentence), but it may not straddle ``</think>``. A row is harmful unless its ``source`` is ``"4o_rewrite"``; an
explicit boolean ``unsafe`` field wins over ``source``. A ``messages`` form is accepted too: a list of chat turns
ending with the assistant turn that holds the response, the offsets then pointing into that last turn's content.

In a data mixture, a row with neither offset is plain SFT data (`question`/`response`, `messages` or TRL's
`prompt`/`completion` form): it trains the LM term only, and is counted as LM-only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
BENIGN_SOURCE = "4o_rewrite"


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

    @property
    def implausible(self) -> str | None:
        """Why the offsets look wrong though they are valid, or None: see [`implausible_offsets`]."""
        if self.lm_only:
            return None
        return implausible_offsets(self.response, self.summary_end_idx, self.next_sentence_end_idx)


@dataclass
class InvalidRowReport:
    """What `skip_invalid=True` left out: a count per field and every error message."""

    errors: list[SafeKeyDataError] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row it repeats)
    implausible: list[tuple[int, str]] = field(default_factory=list)  # (row, why its offsets look wrong), kept

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

    def implausible_summary(self, limit: int = 3) -> str:
        """One line on the valid rows whose offsets look wrong (kept: they may be meant, check them)."""
        examples = "; ".join(f"row {row}: {reason}" for row, reason in self.implausible[:limit])
        more = "; ..." if len(self.implausible) > limit else ""
        return f"{len(self.implausible)} row(s) with implausible offsets, kept (check them): {examples}{more}"

    def note(self, example: SafeKeyExample) -> None:
        """Count a valid example whose offsets look implausible."""
        reason = example.implausible
        if reason is not None:
            self.implausible.append((example.row, reason))


def implausible_offsets(response: str, summary_end: int, key_end: int) -> str | None:
    """Why a valid row's U/K offsets look like a mistake, or None.

    The reference data's empty-trace rows (`<think>\\n\\n</think>\\n\\n{answer}`, U covering the empty think block,
    K the answer's first sentence) are plausible. Flagged: U covering a whole trace that holds text, and `</think>`,
    with K in the answer (an offset counted in the wrong string, say), and a U/K boundary or K's end inside a word.
    """
    trace_end = response.find(THINK_CLOSE)
    reasons = []
    if 0 <= trace_end < summary_end and response[len(THINK_OPEN) : trace_end].strip():
        reasons.append("U covers the whole non-empty trace and </think>, K lies in the answer")
    for name, offset in (("K starts", summary_end), ("K ends", key_end)):
        if 0 < offset < len(response) and response[offset - 1].isalnum() and response[offset].isalnum():
            word_start = offset
            while word_start > 0 and response[word_start - 1].isalnum():
                word_start -= 1
            word_end = offset
            while word_end < len(response) and response[word_end].isalnum():
                word_end += 1
            reasons.append(f"{name} inside the word {response[word_start:word_end]!r} (character {offset})")
    return "; ".join(reasons) or None


def check_reasoning_response(response: str, source: str, number: int, field_name: str = "response") -> int:
    """Raise [`SafeKeyDataError`] unless `response` is `"<think>\\n{trace}\\n</think>\\n\\n{answer}"` with one think
    block (the rule `validate`, `annotate` and `convert` share); return where the trace ends (`"\\n</think>"`)."""
    if not response.startswith(THINK_OPEN) or THINK_CLOSE not in response:
        raise SafeKeyDataError(
            source, number, field_name, "no <think> block: expected '<think>\\n{trace}\\n</think>\\n\\n{answer}'"
        )
    if response.count(OPEN_TAG) > 1 or response.count(CLOSE_TAG) > 1:
        raise SafeKeyDataError(
            source, number, field_name, "a second <think> block: expected one reasoning trace, then the answer"
        )
    return response.index(THINK_CLOSE)


def find_lone_surrogate(value: Any, field_name: str = "<row>") -> tuple[str, str] | None:
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
            found = find_lone_surrogate(item, key if field_name == "<row>" else field_name)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = find_lone_surrogate(item, field_name)
            if found:
                return found
    return None


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


def prompt_and_response(row: dict, source: str, number: int) -> tuple[list[dict[str, str]], str, str]:
    """`(prompt_messages, response, response_field)` of a row in the `question`/`response` or `messages` form,
    checked as [`validate_row`] checks them (a non-empty question, a user turn, one `<think>` block)."""
    prompt, response = _prompt_messages(row, source, number)
    response_field = "messages" if row.get("messages") is not None and row.get("question") is None else "response"
    check_reasoning_response(response, source, number, response_field)
    return prompt, response, response_field


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
    found = find_lone_surrogate(row)
    if found:
        raise SafeKeyDataError(source, number, *found)
    if allow_lm_only and not _has_offsets(row):
        return validate_lm_only_row(row, source, number)
    prompt, response, _ = prompt_and_response(row, source, number)
    trace_end = response.index(THINK_CLOSE)
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
