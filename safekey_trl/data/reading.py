"""Reading SafeKey data: rows from a `.jsonl`, `.json` or `.parquet` file or a Hub dataset, checked one by one.

Row numbers are 1-based (the line number in a `.jsonl` file), so that every error names the file, the row and the
field. A row that cannot be read is yielded as a [`SafeKeyDataError`], for the caller to raise or count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .rows import InvalidRowReport, SafeKeyDataError, SafeKeyExample, find_lone_surrogate, validate_row

logger = logging.getLogger(__name__)

# Files read here row by row (anything else is a Hub dataset name)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _checked(source: str, number: int, row: Any) -> Any:
    """The row itself, or a [`SafeKeyDataError`] in its place when it holds text that is not valid Unicode."""
    found = find_lone_surrogate(row)
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
    row, so that the caller decides whether to raise or to count it. A source without rows (an empty file, `[]`,
    `{"data": []}`) raises `ValueError` once read: it is an error for every command, not an empty dataset.
    """
    rows = 0
    for item in _read_rows(path_or_name, split):
        rows += 1
        yield item
    if not rows:
        raise ValueError(f"{path_or_name}: no rows (the file is empty or an empty list)")


def _read_rows(path_or_name: str, split: str) -> Iterator[tuple[int, Any]]:
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
        from datasets import Dataset

        yield from enumerate(Dataset.from_parquet(str(path)), start=1)
    else:
        from datasets import load_dataset

        from ..offline import hub_name

        with hub_name(path_or_name, "dataset"):
            dataset = load_dataset(path_or_name, split=split)
        yield from enumerate(dataset, start=1)


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
    first_seen: dict[bytes, int] = {}
    for number, row in read_rows(path_or_name, split):
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
        report.note(example)
        # the same prompt, response, offsets and label again; kept (a repeat weights a row up), but counted. A digest
        # of the row, not the row: a copy of every row's text would double the memory a large file takes
        key = hashlib.blake2b(
            json.dumps(
                [
                    example.prompt_messages,
                    example.response,
                    example.summary_end_idx,
                    example.next_sentence_end_idx,
                    example.unsafe,
                ]
            ).encode("utf-8", "surrogatepass"),
            digest_size=16,
        ).digest()
        if key in first_seen:
            report.duplicates.append((number, first_seen[key]))
        else:
            first_seen[key] = number
    if report.count:
        logger.warning(report.summary())
    if report.duplicates:
        logger.warning(report.duplicates_summary())
    if report.implausible:
        logger.warning(report.implausible_summary())
    return examples, report
