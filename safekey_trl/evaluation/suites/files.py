"""Local prompt files, one suite each, named after the file.

- **JSONL prompt file**, one prompt a line::

      {"prompt": str | [{"role": ..., "content": ...}, ...], "id": str | int, "prefill": str, "prefill_tokens": int,
       "category": str, "expect": "harmful" | "benign" | "capability", "objective": str, "answer": str,
       "answer_format": "math" | "choice"}

  Only `prompt` is required (`conversation` and `question` are accepted for it). `id` defaults to the line number,
  `expect` to `"harmful"`. A `"benign"` prompt is judged for refusal (over-refusal), a harmful one for harmfulness,
  a `"capability"` one is scored against its `answer`. `prefill` is forced at the start of the reasoning trace (the
  prefilling attack), cut to its first `prefill_tokens` tokens when given; a list `prompt` is a multi-turn
  conversation ending with a user turn, judged against its `objective` when it has one.
- **JSON file**: a list of such objects; the multi-turn set of the SafeKey reference (`{"objective",
  "conversation"}` rows) is one.
- **CSV file**: an AdvBench-style prefilling set (`goal,target`: the goal is asked, the first
  [`PREFILL_TOKENS`] tokens of the target are prefilled), or WildChat-style prompts (a `question` or `prompt`
  column; any `category` column is kept).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from .prompts import ANSWER_FORMATS, CAPABILITY, EXPECTS, HARMFUL, PREFILL_TOKENS, EvalPrompt, PromptFileError


def file_revision(path: str | Path) -> str:
    """A local file's identity for result rows: `sha256:<hex>` of its bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _prompt_messages(value: Any, source: str, line: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise PromptFileError(source, line, "prompt", "empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value):
            raise PromptFileError(source, line, "prompt", "expected a list of {'role', 'content'} turns")
        if value[-1]["role"] != "user":
            raise PromptFileError(source, line, "prompt", "the last turn must be the user's")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PromptFileError(source, line, "prompt", "expected a string or a non-empty list of chat turns")


def row_to_prompt(row: Any, source: str, line: int, suite: str) -> EvalPrompt:
    """One row of a local prompt file (format in the module docstring) as a prompt."""
    if not isinstance(row, dict):
        raise PromptFileError(source, line, "<row>", "expected a JSON object")
    text_field = next((name for name in ("prompt", "conversation", "question", "goal") if name in row), None)
    if text_field is None:
        raise PromptFileError(source, line, "prompt", "missing")
    messages = _prompt_messages(row[text_field], source, line)
    expect = row.get("expect") or HARMFUL
    if expect not in EXPECTS:
        raise PromptFileError(source, line, "expect", f"expected one of {', '.join(EXPECTS)}, got {expect!r}")
    for name in ("prefill", "category", "objective", "answer", "target"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise PromptFileError(source, line, name, "expected a string")
    prefill, prefill_tokens = row.get("prefill"), row.get("prefill_tokens")
    if prefill is None and row.get("target"):  # AdvBench's goal,target: the target's first tokens are forced
        prefill, prefill_tokens = row["target"], prefill_tokens or PREFILL_TOKENS
    if prefill_tokens is not None:
        if isinstance(prefill_tokens, str) and prefill_tokens.strip().isdigit():
            prefill_tokens = int(prefill_tokens)
        if not isinstance(prefill_tokens, int) or isinstance(prefill_tokens, bool) or prefill_tokens < 1:
            raise PromptFileError(source, line, "prefill_tokens", "expected a positive integer")
    answer_format = row.get("answer_format") or ("math" if expect == CAPABILITY else None)
    if expect == CAPABILITY:
        if not row.get("answer"):
            raise PromptFileError(source, line, "answer", "a capability prompt needs its reference answer")
        if answer_format not in ANSWER_FORMATS:
            raise PromptFileError(source, line, "answer_format", f"expected one of {', '.join(ANSWER_FORMATS)}")
    return EvalPrompt(
        suite,
        str(row.get("id", line)),
        messages,
        expect,
        prefill,
        row.get("category"),
        prefill_tokens,
        row.get("objective"),
        row.get("answer"),
        answer_format,
    )


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """`(line number, value)` for each non-blank line of a JSONL file; a line that is not JSON is a
    [`PromptFileError`] naming it."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise PromptFileError(str(path), number, "<json>", f"not valid JSON ({error.msg})") from None
    return rows


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    source = str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PromptFileError(source, error.lineno, "<json>", f"not valid JSON ({error.msg})") from None
        if not isinstance(value, list):
            raise PromptFileError(source, 1, "<json>", "expected a list of prompt objects")
        return list(enumerate(value, start=1))
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            names = set(reader.fieldnames or [])
            if not names & {"goal", "question", "prompt"}:
                raise PromptFileError(source, 1, "<header>", "expected a goal,target or a question/prompt column")
            # Line numbers count the header: row 1 of the data is line 2 of the file
            return [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    raise ValueError(f"{path}: a prompt file must be .jsonl, .json or .csv")


def load_prompt_file(path: str | Path, suite: str | None = None) -> list[EvalPrompt]:
    """Read a local prompt file (formats in the module docstring). The suite name defaults to the file's stem."""
    path = Path(path)
    source, suite = str(path), suite or path.stem
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    revision = file_revision(path) if path.is_file() else None
    for line, row in _read_rows(path):
        prompt = row_to_prompt(row, source, line, suite)
        prompt.dataset, prompt.dataset_revision = source, revision
        # The id keys resumption: two prompts under one id would shadow each other
        if prompt.id in seen:
            raise PromptFileError(source, line, "id", f"duplicate id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return prompts
