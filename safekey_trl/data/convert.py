"""Convert common safety-SFT layouts to the SafeKey reference format (offsets come from `annotate`).

Two input layouts:

- ``star1``: the STAR-1 layout, ``{"id", "question", "response", "category", "source", "score"}`` with an R1-style
  response. Every field is kept; the row is harmful unless its ``source`` is ``"4o_rewrite"`` or a label option
  says otherwise.
- ``messages``: chat rows ``{"messages": [..., {"role": "user"}, {"role": "assistant"}], ...}``. The assistant turn's
  reasoning is its ``<think>`` block, or its ``reasoning_content``/``reasoning`` field (as some APIs return it) when
  the content has none. A prompt that is a single user turn becomes ``question``/``response``; a longer one (a system
  prompt, earlier turns) stays a ``messages`` row, which the loader accepts too. Other fields are kept.

Responses are normalized to ``"<think>\\n{trace}\\n</think>\\n\\n{answer}"`` (a missing opening ``<think>``, which R1
models leave in the generation prompt, is added; the whitespace around the tags is made exact), because the
offsets and the trainer's rendering rely on that shape. ``--benign`` sets ``unsafe: false`` (harmless look-alikes,
SafeKey's ``4o_rewrite`` rows), ``--harmful`` sets ``unsafe: true``; ``--column-map old=new`` renames input columns
first (e.g. ``prompt=question``, ``is_harmful=unsafe``). A bad row raises [`SafeKeyDataError`] naming the file, the
row and the field; the rules are `data validate`'s (one ``<think>`` block; offsets a row already has are kept only
where normalising left the response unchanged, and checked).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .reading import read_rows
from .rows import BENIGN_SOURCE, SafeKeyDataError, check_reasoning_response, validate_row

FORMATS = ("star1", "messages")
LABELS = ("benign", "harmful")
OFFSET_FIELDS = ("summary_end_idx", "next_sentence_end_idx")


def parse_column_map(items: Iterable[str]) -> dict[str, str]:
    """`["old=new", ...]` -> `{"old": "new"}`. Raises `ValueError` on an item without exactly one `=`."""
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip() or "=" in new:
            raise ValueError(f"--column-map expects old=new, got {item!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def normalize_response(text: str, reasoning: str | None = None) -> str:
    """`"<think>\\n{trace}\\n</think>\\n\\n{answer}"` from an R1-style response, or from an answer and its reasoning.

    Raises `ValueError` when there is no `</think>` and no separate reasoning, or when the trace is empty.
    """
    if "</think>" in text:
        trace, _, answer = text.partition("</think>")
        trace = trace.strip()
        trace = trace.removeprefix("<think>").strip()
    elif reasoning is not None and reasoning.strip():
        trace, answer = reasoning.strip(), text
    else:
        raise ValueError("no reasoning trace: expected '<think>...</think>' in the response")
    if not trace:
        raise ValueError("the reasoning trace is empty")
    return f"<think>\n{trace}\n</think>\n\n{answer.strip()}"


@dataclass
class ConvertReport:
    """What [`convert_rows`] did: counts and the errors of the rows it skipped."""

    rows: int = 0
    converted: int = 0
    harmful: int = 0
    benign: int = 0
    with_offsets: int = 0  # rows that kept their U/K offsets, checked as `data validate` checks them
    offsets_dropped: list[int] = field(default_factory=list)  # rows whose offsets normalising invalidated
    errors: list[SafeKeyDataError] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.rows} rows read, {self.converted} converted ({self.harmful} harmful, {self.benign} benign)"]
        if self.offsets_dropped:
            rows = ", ".join(str(row) for row in self.offsets_dropped[:5])
            more = ", ..." if len(self.offsets_dropped) > 5 else ""
            lines.append(
                f"  offsets dropped: {len(self.offsets_dropped)} (rows {rows}{more}): normalising the response moved "
                "the text they pointed into; annotate these rows"
            )
        if self.errors:
            lines.append(f"  skipped: {len(self.errors)}")
            lines += [f"    {error}" for error in self.errors[:10]]
            if len(self.errors) > 10:
                lines.append(f"    ... and {len(self.errors) - 10} more")
        return "\n".join(lines)


def _apply_column_map(row: dict[str, Any], mapping: dict[str, str], source: str, number: int) -> dict[str, Any]:
    renamed = dict(row)
    for old, new in mapping.items():
        if old not in row:
            raise SafeKeyDataError(source, number, old, f"missing (named in --column-map {old}={new})")
        renamed[new] = renamed.pop(old)
    return renamed


def _apply_label(row: dict[str, Any], label: str | None, source: str, number: int) -> None:
    """Set `unsafe` from the label option, or check the row carries a usable label of its own."""
    if label is not None:
        row["unsafe"] = label == "harmful"
    elif row.get("unsafe") is not None:
        if not isinstance(row["unsafe"], bool):
            raise SafeKeyDataError(source, number, "unsafe", f"expected bool, got {type(row['unsafe']).__name__}")
    elif not isinstance(row.get("source"), str):
        raise SafeKeyDataError(
            source,
            number,
            "source",
            "no label: the row has neither 'unsafe' nor a 'source' string; pass --benign or --harmful, "
            "or map a column with --column-map",
        )


def _convert_star1(row: dict[str, Any], source: str, number: int) -> dict[str, Any]:
    for name in ("question", "response"):
        value = row.get(name)
        if value is None:
            raise SafeKeyDataError(source, number, name, "missing")
        if not isinstance(value, str):
            raise SafeKeyDataError(source, number, name, f"expected str, got {type(value).__name__}")
    if not row["question"].strip():
        raise SafeKeyDataError(source, number, "question", "empty")
    try:
        response = normalize_response(row["response"])
    except ValueError as error:
        raise SafeKeyDataError(source, number, "response", str(error)) from None
    return {**row, "response": response}


def _convert_messages(row: dict[str, Any], source: str, number: int) -> dict[str, Any]:
    messages = row.get("messages")
    if messages is None:
        raise SafeKeyDataError(source, number, "messages", "missing")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise SafeKeyDataError(source, number, "messages", "expected a list of {'role', 'content'} turns")
    if not messages or messages[-1]["role"] != "assistant":
        raise SafeKeyDataError(source, number, "messages", "the last turn must be the assistant's response")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise SafeKeyDataError(source, number, "messages", "no user turn before the response")
    assistant = messages[-1]
    reasoning = assistant.get("reasoning_content") or assistant.get("reasoning")
    try:
        response = normalize_response(assistant["content"], reasoning if isinstance(reasoning, str) else None)
    except ValueError as error:
        raise SafeKeyDataError(source, number, "messages", f"assistant turn: {error}") from None
    rest = {name: value for name, value in row.items() if name != "messages"}
    if len(prompt) == 1:
        return {"question": prompt[0]["content"], "response": response, **rest}
    return {"messages": [*prompt, {"role": "assistant", "content": response}], **rest}


def convert_row(
    row: Any,
    layout: str,
    source: str = "<memory>",
    number: int = 0,
    label: str | None = None,
    column_map: dict[str, str] | None = None,
    keep_offsets: bool = True,
) -> dict[str, Any]:
    """Convert one row from `layout` (`star1` or `messages`) to the SafeKey format.

    `label` (`"benign"` or `"harmful"`) sets `unsafe`; without it the row must carry `unsafe` or `source`. The response
    must hold one `<think>` block, as `data validate` requires. U/K offsets the row already has are kept when the
    response needed no normalising, and then checked as `data validate` checks them; when normalising changed the
    response they no longer point where they did and are dropped (see [`convert_rows`], which counts them). With
    `keep_offsets=False` they are passed through unchecked (for `annotate`, which replaces them).
    """
    return _convert_row(row, layout, source, number, label, column_map, keep_offsets)[0]


def _response_of(row: dict[str, Any]) -> Any:
    messages = row.get("messages")
    if row.get("question") is None and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("content")
    return row.get("response")


def _convert_row(
    row: Any,
    layout: str,
    source: str,
    number: int,
    label: str | None,
    column_map: dict[str, str] | None,
    keep_offsets: bool,
) -> tuple[dict[str, Any], bool]:
    """The converted row, and whether its offsets were dropped."""
    if layout not in FORMATS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(FORMATS)}")
    if label is not None and label not in LABELS:
        raise ValueError(f"unknown label {label!r}: expected one of {', '.join(LABELS)}")
    if isinstance(row, SafeKeyDataError):
        raise row
    if not isinstance(row, dict):
        raise SafeKeyDataError(source, number, "<row>", f"expected a JSON object, got {type(row).__name__}")
    row = _apply_column_map(row, column_map or {}, source, number)
    converted = _convert_star1(row, source, number) if layout == "star1" else _convert_messages(row, source, number)
    response_field = "response" if layout == "star1" else "messages"
    check_reasoning_response(_response_of(converted), source, number, response_field)
    _apply_label(converted, label, source, number)
    if not keep_offsets or not any(converted.get(name) is not None for name in OFFSET_FIELDS):
        return converted, False
    if _response_of(converted) != _response_of(row):
        return {name: value for name, value in converted.items() if name not in OFFSET_FIELDS}, True
    validate_row(converted, source, number)
    return converted, False


def is_harmful(row: dict[str, Any]) -> bool:
    """The SafeKey label rule: an explicit `unsafe` wins, else harmful unless `source` is `"4o_rewrite"`."""
    if row.get("unsafe") is not None:
        return bool(row["unsafe"])
    return row.get("source") != BENIGN_SOURCE


def convert_rows(
    rows: Iterable[tuple[int, Any]],
    layout: str,
    source: str = "<memory>",
    label: str | None = None,
    column_map: dict[str, str] | None = None,
    skip_invalid: bool = False,
    keep_offsets: bool = True,
) -> tuple[list[dict[str, Any]], ConvertReport]:
    """Convert `(row_number, row)` pairs; a bad row raises [`SafeKeyDataError`] unless `skip_invalid`. The report
    counts the rows that kept checked offsets and those whose offsets were dropped (see [`convert_row`])."""
    report = ConvertReport()
    converted: list[dict[str, Any]] = []
    for number, row in rows:
        report.rows += 1
        try:
            result, dropped = _convert_row(row, layout, source, number, label, column_map, keep_offsets)
        except SafeKeyDataError as error:
            if not skip_invalid:
                raise
            report.errors.append(error)
            continue
        converted.append(result)
        report.converted += 1
        if dropped:
            report.offsets_dropped.append(number)
        elif keep_offsets and any(result.get(name) is not None for name in OFFSET_FIELDS):
            report.with_offsets += 1
        if is_harmful(result):
            report.harmful += 1
        else:
            report.benign += 1
    return converted, report


def convert_file(
    in_path: str,
    layout: str,
    label: str | None = None,
    column_map: dict[str, str] | None = None,
    skip_invalid: bool = False,
    keep_offsets: bool = True,
) -> tuple[list[dict[str, Any]], ConvertReport]:
    """Read and convert a `.jsonl`, `.json`, `.parquet` file or a Hub dataset; the rows are returned, not written."""
    return convert_rows(read_rows(in_path), layout, str(in_path), label, column_map, skip_invalid, keep_offsets)
