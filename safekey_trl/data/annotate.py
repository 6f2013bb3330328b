"""Find the query understanding U and the key sentence K in reasoning traces: sentence splitting, a heuristic, an LLM.

SafeKey needs, for every row, two character offsets into ``response = "<think>\\n{trace}\\n</think>\\n\\n{answer}"``:
``summary_end_idx`` (U = ``response[:summary_end_idx]``) and ``next_sentence_end_idx`` (K =
``response[summary_end_idx:next_sentence_end_idx]``). Both methods split the trace into sentences first
([`split_sentences`]) and then choose the sentence that is K; U is every sentence before it. A sentence span starts
where the previous one ended, so the whitespace before K belongs to K, and it ends right after its terminal
punctuation (closing quotes and brackets included).

**Sentence splitting.** A sentence ends at ``.``, ``?``, ``!`` or an ellipsis (``...``, ``…``), with any closing
quotes or brackets, when whitespace follows and the next word does not start in lower case. It does not end after
"e.g.", "i.e.", "cf.", "vs.", titles ("Dr.", "Mr.", "Mrs.", "Ms.", "Prof.", "St.", "Jr.", "Sr."), "No."/"approx."
before a number, or a list number ("1." at the start of a line). A period with no whitespace after it ("3.5",
"example.com") never ends one. A line break ends a sentence at a blank line (paragraph), before a list item ("- ",
"* ", "• ", "1. ", "2) "), after a list item, a heading or a line ending in ":"; any other single line break is a
hard wrap inside a sentence. A fenced code block is one unit of its own, and nothing inside inline code splits.

**The heuristic** (``method="heuristic"``, offline). R1-style traces open by restating the request ("Okay, so the
user is asking how to ..."), and SafeKey's U is that restatement:

1. U starts with the first sentence (with the second too when the first is a bare interjection of at most two words,
   such as "Okay." or "Hmm, right.").
2. U grows by each next sentence that *continues the restatement*: it does not open with a reaction ("But", "Hmm",
   "Wait", "Hold on", "That's", "This", "I ...", "Let me", ...), and it either opens with the user as its subject
   ("They ...", "Their ...", "The user ...", "He/She ...") or reports what the user said ("... they want ...",
   "... they mention ...") or names the request ("... a request for ..."). U holds at most 3 sentences, and always
   leaves a sentence for K.
3. K is the next sentence.

The row is flagged **unsure** when the opening sentence does not look like a restatement (no mention of the user,
the request or a question), when U reached its 3-sentence cap, or when the trace is a single sentence: then U is
that sentence up to its first clause break (", ", "; ", ": ", " - ") after at least three words and K the rest, and a
single sentence with no clause break cannot be annotated (the row fails).

**The LLM method** (``method="llm"``) sends the request and the numbered sentences to any OpenAI-compatible
chat-completions endpoint and asks which sentence is the first one after the understanding; see [`LLMSettings`].
Answers are cached in a JSONL file keyed by a hash of the model, the prompt version, the question and the trace,
so an interrupted run loses nothing; rows it cannot annotate are reported, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..llm_client import ChatClient, LLMRequestError
from .reading import read_rows
from .rows import THINK_CLOSE, THINK_OPEN, SafeKeyDataError, prompt_and_response, validate_row

logger = logging.getLogger(__name__)

METHODS = ("heuristic", "llm")

# ---------------------------------------------------------------------------------------------------------------------
# Sentence splitting

# Abbreviations after which a period never ends a sentence, whatever follows (compared lower-cased, without the dot)
_NO_SPLIT = frozenset({"e.g", "eg", "i.e", "ie", "cf", "vs", "viz", "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr"})
# Abbreviations that do not end a sentence when a number follows ("No. 5", "approx. 3 cups")
_BEFORE_NUMBER = frozenset({"no", "nos", "approx", "fig", "vol", "p", "pp", "ch", "sec", "art", "ca"})
_TERMINALS = ".?!…"
_CLOSERS = "\"'”’)]}»*_"
_OPENERS = "\"'“‘([{«*_"
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*•+]|\d{1,3}[.)])[ \t]+\S")
_HEADING = re.compile(r"[ \t]*#{1,6}[ \t]")
_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*$", re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]+`")


def _protected_regions(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Fenced code blocks (whole lines, fence to fence; an unclosed fence runs to the end) and inline code spans."""
    fences: list[tuple[int, int]] = []
    matches = list(_FENCE.finditer(text))
    index = 0
    while index < len(matches):
        opening = matches[index]
        marker = opening.group(1)
        closing = next((m for m in matches[index + 1 :] if m.group(1) == marker), None)
        if closing is None:
            fences.append((opening.start(), len(text)))
            break
        fences.append((opening.start(), closing.end()))
        index = matches.index(closing) + 1
    inline = [
        (m.start(), m.end())
        for m in _INLINE_CODE.finditer(text)
        if not any(start <= m.start() < end for start, end in fences)
    ]
    return fences, inline


def _rstrip_end(text: str, end: int, floor: int) -> int:
    """The position right after the last non-whitespace character of `text[floor:end]` (or `floor`)."""
    while end > floor and text[end - 1].isspace():
        end -= 1
    return end


def _line_bounds(text: str, position: int) -> tuple[int, int]:
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    return start, len(text) if end < 0 else end


def _period_ends_sentence(text: str, index: int, next_char: str) -> bool:
    """Whether the single `.` at `index` ends a sentence, given the first character of the next word."""
    word_start = index
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:index].lstrip(_OPENERS).lower()
    if word in _NO_SPLIT:
        return False
    if word in _BEFORE_NUMBER and next_char.isdigit():
        return False
    line_start = text.rfind("\n", 0, index) + 1
    # "1." opening a line is a list number, not the end of a sentence
    return not (word.isdigit() and len(word) <= 3 and not text[line_start:word_start].strip())


def _newline_ends_sentence(text: str, newline: int) -> bool:
    """Whether the line break at `newline` ends the sentence running on the line before it."""
    line_start, _ = _line_bounds(text, newline)
    line = text[line_start:newline]
    next_start = newline + 1
    _, next_end = _line_bounds(text, next_start) if next_start < len(text) else (next_start, next_start)
    next_line = text[next_start:next_end]
    return (
        not next_line.strip()  # a blank line: a paragraph break
        or bool(_LIST_ITEM.match(next_line))
        or bool(_LIST_ITEM.match(line))
        or bool(_HEADING.match(line))
        or line.rstrip().endswith(":")
    )


def sentence_boundaries(text: str) -> list[int]:
    """Every position in `text` where a sentence ends (right after its punctuation and closing quotes), sorted."""
    fences, inline = _protected_regions(text)
    boundaries: set[int] = set()
    skip = {start: end for start, end in fences + inline}
    for start, end in fences:
        # A code block is a unit of its own: the sentence before it ends, and so does the block
        boundaries.add(_rstrip_end(text, start, 0))
        boundaries.add(end)
    n = len(text)
    i = 0
    while i < n:
        if i in skip:
            i = skip[i]
            continue
        char = text[i]
        if char == "\n":
            if _newline_ends_sentence(text, i):
                boundaries.add(_rstrip_end(text, i, 0))
            i += 1
            continue
        if char not in _TERMINALS:
            i += 1
            continue
        j = i
        while j < n and text[j] in _TERMINALS:
            j += 1
        run = text[i:j]
        while j < n and text[j] in _CLOSERS:
            j += 1
        if j >= n:
            boundaries.add(j)
            break
        if not text[j].isspace():  # "3.5", "example.com", "wait...what": no whitespace, no sentence end
            i = j
            continue
        k = j
        while k < n and text[k].isspace():
            k += 1
        if k >= n:
            boundaries.add(j)
            break
        next_char = text[k]
        ends = not next_char.islower()  # a lower-case next word continues the sentence ("e.g. bleach", "... and")
        if ends and run == ".":
            ends = _period_ends_sentence(text, i, next_char)
        if ends:
            boundaries.add(j)
        i = j
    return sorted(b for b in boundaries if 0 < b <= n)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Split `text` into sentence spans `(start, end)` (character offsets into `text`).

    Spans are contiguous: each starts where the previous one ended, so a sentence's leading whitespace belongs to it,
    and each ends right after its terminal punctuation and closing quotes. Trailing whitespace at the end of `text`
    belongs to no sentence. The rules are in the module docstring.
    """
    spans: list[tuple[int, int]] = []
    previous = 0
    for boundary in [*sentence_boundaries(text), _rstrip_end(text, len(text), 0)]:
        if boundary > previous and text[previous:boundary].strip():
            spans.append((previous, boundary))
            previous = boundary
    return spans


def trace_bounds(response: str) -> tuple[int, int]:
    """`(start, end)` of the reasoning trace in a response `"<think>\\n{trace}\\n</think>\\n\\n{answer}"`."""
    if not response.startswith(THINK_OPEN) or THINK_CLOSE not in response:
        raise ValueError("no <think> block: expected '<think>\\n{trace}\\n</think>\\n\\n{answer}'")
    return len(THINK_OPEN), response.index(THINK_CLOSE)


def response_sentences(response: str) -> list[tuple[int, int]]:
    """The trace's sentence spans as offsets into `response` (U and K are unions of these)."""
    start, end = trace_bounds(response)
    return [(start + a, start + b) for a, b in split_sentences(response[start:end])]


# ---------------------------------------------------------------------------------------------------------------------
# The heuristic

_RESTATEMENT = re.compile(
    r"\b(user|users|they|they're|their|them|someone|somebody|person|asking|asks|asked|ask|wants?|wanting|"
    r"request(?:s|ed|ing)?|question|prompt|query|inquiring|wondering)\b"
    r"|\bI(?:'m| am)? (?:being )?asked\b|\bI need to (?:figure out|explain|answer|write|help|find|describe)\b",
    re.IGNORECASE,
)
# A sentence opening with one of these reacts to the request rather than restating it
_REACTION = re.compile(
    r"(?:but|however|hmm+|wait|hold on|that|that's|this|these|those|it's|well|although|though|still|yet|actually|"
    r"oh|ah|no|yes|so,? i|i|i'm|i'll|i've|i'd|let me|let's|first|now|okay|ok|alright|here)\b",
    re.IGNORECASE,
)
_USER_SUBJECT = re.compile(r"(?:they|their|they're|theirs|the user|the user's|user|he|she|his|her)\b", re.IGNORECASE)
_USER_REPORTS = re.compile(
    r"\b(?:they|he|she|the user)(?:'re| are| is)?\s+(?:also\s+|just\s+|specifically\s+|even\s+)?"
    r"(?:want|wants|say|says|said|ask|asks|asked|asking|mention|mentions|mentioned|clarify|clarifies|clarified|add|"
    r"adds|added|explain|explains|explained|note|notes|noted|frame|frames|framed|framing|claim|claims|claimed|"
    r"describe|describes|described|specify|specifies|specified|need|needs|insist|insists)\b"
    r"|\brequest\b",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"(?:,|;|:| -| —| –)(?=\s+\S)")
MAX_UNDERSTANDING_SENTENCES = 3


def _continues_restatement(sentence: str) -> bool:
    """Whether a sentence after the opening one still restates the request (see the module docstring, rule 2)."""
    body = sentence.strip().lstrip(_OPENERS)
    if _REACTION.match(body):
        return False
    return bool(_USER_SUBJECT.match(body) or _USER_REPORTS.search(body))


@dataclass
class Annotation:
    """Where U and K end in a response, and how that was found (written to the row's `annotation` field)."""

    summary_end_idx: int
    next_sentence_end_idx: int
    method: str
    key_sentence: int  # 1-based number of K among the trace's sentences
    sentences: int  # how many sentences the trace has
    unsure: bool = False
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The per-row `annotation` record."""
        return {
            "method": self.method,
            "key_sentence": self.key_sentence,
            "understanding_sentences": self.key_sentence - 1,
            "sentences": self.sentences,
            "unsure": self.unsure,
            "reasons": list(self.reasons),
            **self.extra,
        }


class AnnotationError(ValueError):
    """A row whose U and K could not be found; the message says why."""


def _single_sentence(response: str, span: tuple[int, int]) -> Annotation:
    """U and K from a one-sentence trace: split at its first clause break after three words."""
    start, end = span
    sentence = response[start:end]
    for match in _CLAUSE_BREAK.finditer(sentence):
        if len(sentence[: match.start()].split()) >= 3 and sentence[match.end() :].strip():
            summary_end = start + match.end()
            return Annotation(
                summary_end,
                end,
                "heuristic",
                key_sentence=1,
                sentences=1,
                unsure=True,
                reasons=["one-sentence trace: U and K split at a clause break"],
                extra={"clause_split": True},
            )
    raise AnnotationError("the trace is a single sentence with no clause break to split U from K")


def heuristic_annotation(response: str) -> Annotation:
    """Find U and K in one response with the heuristic (the rule is in the module docstring).

    Raises:
        AnnotationError: the trace is empty, or one sentence with no clause break.
        ValueError: the response has no `<think>` block.
    """
    spans = response_sentences(response)
    if not spans:
        raise AnnotationError("the reasoning trace is empty")
    if len(spans) == 1:
        return _single_sentence(response, spans[0])
    texts = [response[a:b] for a, b in spans]
    reasons: list[str] = []
    understanding = 1
    # "Okay." alone says nothing: the restatement is the sentence after it
    if len(texts[0].split()) <= 2 and len(spans) > 2:
        understanding = 2
    opening = " ".join(texts[:understanding])
    if not _RESTATEMENT.search(opening):
        reasons.append("the opening sentence does not look like a restatement of the request")
    while understanding < len(spans) - 1 and _continues_restatement(texts[understanding]):
        if understanding >= MAX_UNDERSTANDING_SENTENCES:
            reasons.append(f"U reached the cap of {MAX_UNDERSTANDING_SENTENCES} sentences")
            break
        understanding += 1
    return Annotation(
        summary_end_idx=spans[understanding - 1][1],
        next_sentence_end_idx=spans[understanding][1],
        method="heuristic",
        key_sentence=understanding + 1,
        sentences=len(spans),
        unsure=bool(reasons),
        reasons=reasons,
    )


def annotation_from_key_sentence(response: str, key_sentence: int, method: str, **extra: Any) -> Annotation:
    """The annotation whose K is sentence number `key_sentence` (1-based, at least 2) of the trace."""
    spans = response_sentences(response)
    if not 2 <= key_sentence <= len(spans):
        raise AnnotationError(f"key sentence {key_sentence} is out of range: the trace has {len(spans)} sentences")
    return Annotation(
        spans[key_sentence - 2][1], spans[key_sentence - 1][1], method, key_sentence, len(spans), extra=extra
    )


def key_sentence_of(response: str, next_sentence_end_idx: int) -> int | None:
    """The 1-based number of the sentence holding the end of K (for comparing with a hand annotation)."""
    for number, (start, end) in enumerate(response_sentences(response), start=1):
        if start < next_sentence_end_idx <= end:
            return number
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The LLM method: the shared OpenAI-compatible client (llm_client.py) and a resumable cache

PROMPT_VERSION = "safekey-key-sentence-v1"  # part of the cache key: a new prompt must not reuse old answers
_SYSTEM_PROMPT = (
    "You segment the reasoning traces of AI assistants. A trace opens with the assistant's understanding of the "
    "user's request: its restatement of what the user asked, one or a few sentences. The sentence right after that "
    "understanding is the key sentence, where the assistant starts reacting to or working on the request. "
    "Reply with the number of the key sentence only."
)


@dataclass
class LLMSettings:
    """How to reach an OpenAI-compatible endpoint (POST `{base_url}/chat/completions`) and how hard to try.

    Use [`resolve_llm_settings`] to fill the endpoint from options or the environment.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0  # seconds per request
    max_retries: int = 4  # retries after the first attempt, so at most max_retries + 1 requests a row
    backoff: float = 1.0  # the first retry waits this long, then doubles (with jitter), up to max_backoff
    max_backoff: float = 30.0
    concurrency: int = 8
    max_sentences: int = 30  # K is near the start: later sentences are not sent (fewer tokens, same answer)
    max_sentence_chars: int = 500
    _client: ChatClient | None = field(default=None, init=False, repr=False, compare=False)

    def client(self) -> ChatClient:
        """The shared client for these settings (made on first use; thread-safe to share)."""
        if self._client is None:
            self._client = ChatClient(
                self.base_url,
                self.model,
                self.api_key,
                timeout=self.timeout,
                max_retries=self.max_retries,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
            )
        return self._client


def resolve_llm_settings(
    base_url: str | None = None, model: str | None = None, api_key: str | None = None, **options: Any
) -> LLMSettings:
    """LLM settings from explicit values, else `SAFEKEY_LLM_BASE_URL` / `SAFEKEY_LLM_MODEL` / `SAFEKEY_LLM_API_KEY`,
    else `OPENAI_BASE_URL` / `OPENAI_API_KEY`. Raises `ValueError` naming what is missing."""
    base_url = base_url or os.environ.get("SAFEKEY_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    model = model or os.environ.get("SAFEKEY_LLM_MODEL")
    api_key = api_key or os.environ.get("SAFEKEY_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    missing = [
        name
        for name, value in (("--base-url or SAFEKEY_LLM_BASE_URL", base_url), ("--model or SAFEKEY_LLM_MODEL", model))
        if not value
    ]
    if missing:
        raise ValueError("the llm method needs " + " and ".join(missing))
    return LLMSettings(base_url=base_url.rstrip("/"), model=model, api_key=api_key, **options)


# A failed request or an unusable reply (`retryable` is False when asking again cannot help, e.g. HTTP 401)
LLMReplyError = LLMRequestError


def build_messages(question: str, sentences: list[str]) -> list[dict[str, str]]:
    """The chat messages asking which numbered sentence is K."""
    numbered = "\n".join(f"[{number}] {text}" for number, text in enumerate(sentences, start=1))
    user = (
        f"User request:\n{question}\n\nReasoning trace, one numbered sentence per line:\n{numbered}\n\n"
        "Which numbered sentence is the first one after the understanding (the restatement of the request)? "
        f"Answer with its number only, from 2 to {len(sentences)}."
    )
    return [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_key_sentence(content: str, sentence_count: int) -> int:
    """The sentence number in a reply: a bare number, "Sentence 3", "[3]" or `{"key_sentence": 3}`.

    Raises `LLMReplyError` when the reply holds no number, several different ones, or one outside `2..count`.
    """
    text = re.sub(r"<think>.*?</think>", "", content, flags=re.DOTALL).strip()  # a reasoning model's own trace
    numbers = {int(number) for number in re.findall(r"\d+", text)}
    if len(numbers) != 1:
        raise LLMReplyError(f"expected one sentence number in the reply, got {text[:80]!r}")
    number = numbers.pop()
    if not 2 <= number <= sentence_count:
        raise LLMReplyError(f"sentence number {number} is out of range 2..{sentence_count}")
    return number


def ask_key_sentence(
    settings: LLMSettings, question: str, sentences: list[str], sleep: Callable[[float], None] = time.sleep
) -> tuple[int, int]:
    """Ask the endpoint for K's number, retrying with exponential back-off; `(number, attempts)`.

    Raises `LLMReplyError` with the last error when every attempt failed.
    """
    shown = [" ".join(text.split())[: settings.max_sentence_chars] for text in sentences[: settings.max_sentences]]
    number, _, attempts = settings.client().ask(
        build_messages(question, shown), lambda content: parse_key_sentence(content, len(shown)), sleep=sleep
    )
    return number, attempts


def cache_key(model: str, trace: str, question: str = "") -> str:
    """The cache key of one row's trace (and question, which the prompt shows too) under one model and prompt."""
    return hashlib.sha256(f"{PROMPT_VERSION}\0{model}\0{question}\0{trace}".encode()).hexdigest()


class AnswerCache:
    """A JSONL file of LLM answers, appended to (and flushed) as each arrives, so an interrupted run loses nothing.

    A torn last line (the process died mid-write) is ignored on load. Safe to share between threads.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._answers: dict[str, dict[str, Any]] = {}
        # After a torn last line the next entry must start on a line of its own, or it would be lost with it
        self._needs_newline = False
        if self.path.is_file():
            with self.path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell():
                    handle.seek(-1, os.SEEK_END)
                    self._needs_newline = handle.read(1) != b"\n"
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                        self._answers[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entry = {"key": key, **entry}
        with self._lock:
            self._answers[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                if self._needs_newline:
                    handle.write("\n")
                    self._needs_newline = False
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                handle.flush()


def llm_annotation(
    response: str, question: str, settings: LLMSettings, cache: AnswerCache | None = None
) -> Annotation:
    """Find U and K in one response by asking the LLM (or the cache). Raises `AnnotationError` or `LLMReplyError`."""
    spans = response_sentences(response)
    if len(spans) < 2:
        raise AnnotationError(f"the trace has {len(spans)} sentence(s): U and K need at least two")
    start, end = trace_bounds(response)
    key = cache_key(settings.model, response[start:end], question)
    shown = min(len(spans), settings.max_sentences)
    cached = cache.get(key) if cache is not None else None
    # A cached number is reused only while it still fits this trace's sentences (the splitter may have changed)
    if cached is not None and isinstance(cached.get("key_sentence"), int) and 2 <= cached["key_sentence"] <= shown:
        return annotation_from_key_sentence(
            response, cached["key_sentence"], "llm", model=settings.model, cached=True, attempts=0
        )
    number, attempts = ask_key_sentence(settings, question, [response[a:b] for a, b in spans])
    if cache is not None:
        cache.put(key, {"model": settings.model, "key_sentence": number, "sentences": len(spans)})
    return annotation_from_key_sentence(response, number, "llm", model=settings.model, cached=False, attempts=attempts)


# ---------------------------------------------------------------------------------------------------------------------
# Rows and files


def _question_and_response(row: Any, source: str, number: int) -> tuple[str, str, str]:
    """`(question, response, response_field)` of a raw row, in the `question`/`response` or `messages` form."""
    if not isinstance(row, dict):
        raise SafeKeyDataError(source, number, "<row>", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row and "question" not in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"
        ):
            raise SafeKeyDataError(source, number, "messages", "expected chat turns ending with the assistant's")
        question = next((m["content"] for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
        return question, messages[-1]["content"], "messages"
    for name in ("question", "response"):
        if not isinstance(row.get(name), str):
            problem = "missing" if row.get(name) is None else f"expected str, got {type(row[name]).__name__}"
            raise SafeKeyDataError(source, number, name, problem)
    return row["question"], row["response"], "response"


@dataclass
class AnnotateReport:
    """What [`annotate_rows`] did: counts, and the rows it could not annotate with their reasons."""

    method: str
    rows: int = 0
    annotated: int = 0
    unsure: int = 0
    cached: int = 0
    requests: int = 0  # sent, retries included
    failed_requests: int = 0  # of those, the ones that failed or got an unusable reply
    unlabelled: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.rows} rows read, {self.annotated} annotated with the {self.method} method"]
        if self.method == "heuristic":
            lines.append(f"  unsure: {self.unsure} (see each row's annotation.reasons)")
        else:
            lines.append(
                f"  from the cache: {self.cached}; requests sent: {self.requests}, failed: {self.failed_requests}"
            )
        if self.unlabelled:
            lines.append(
                f"  {self.unlabelled} row(s) have neither 'source' nor 'unsafe': label them before training "
                "(safekey-trl data convert --benign/--harmful, or add the field)"
            )
        if self.failed:
            lines.append(f"  failed: {len(self.failed)}")
            lines += [f"    row {number}: {reason}" for number, reason in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"    ... and {len(self.failed) - 10} more")
        return "\n".join(lines)


def annotate_rows(
    rows: Iterable[tuple[int, Any]],
    method: str = "heuristic",
    source: str = "<memory>",
    settings: LLMSettings | None = None,
    cache: AnswerCache | None = None,
    skip_invalid: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], AnnotateReport]:
    """Annotate `(row_number, row)` pairs; `(annotated_rows, failed_rows, report)`, both lists in input order.

    Each annotated row keeps every input field and gets `summary_end_idx`, `next_sentence_end_idx` (replacing any
    there, whose old values go to `annotation.previous`) and an `annotation` record. A failed row is the input row
    with an `annotation_error` field (`{"row", "reason"}`). A malformed row (not an object, no `question`/`response`,
    no `<think>` block) raises [`SafeKeyDataError`] unless `skip_invalid`, which fails it like the others.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "llm" and settings is None:
        raise ValueError("the llm method needs LLMSettings")
    report = AnnotateReport(method)
    items = list(rows)
    report.rows = len(items)
    outcomes: list[Annotation | str | None] = [None] * len(items)
    failed_requests = [0] * len(items)  # requests sent for a row whose every attempt failed
    inputs: list[tuple[str, str] | None] = [None] * len(items)
    for index, (number, row) in enumerate(items):
        try:
            if isinstance(row, SafeKeyDataError):
                raise row
            question, response, _ = _question_and_response(row, source, number)
            prompt_and_response(row, source, number)  # the rules `data validate` applies to the same fields
            inputs[index] = (question, response)
        except SafeKeyDataError as error:
            if not skip_invalid:
                raise
            outcomes[index] = f"field '{error.field_name}': {error.message}"

    def solve(index: int) -> Annotation | str:
        question, response = inputs[index]  # type: ignore[misc]
        try:
            if method == "heuristic":
                return heuristic_annotation(response)
            return llm_annotation(response, question, settings, cache)  # type: ignore[arg-type]
        except LLMReplyError as error:
            failed_requests[index] = error.attempts
            return str(error)
        except AnnotationError as error:
            return str(error)

    pending = [index for index in range(len(items)) if inputs[index] is not None]
    workers = max(1, settings.concurrency) if method == "llm" and len(pending) > 1 else 1  # type: ignore[union-attr]
    done: dict[int, Annotation | str] = {}
    try:
        _map_in_threads(solve, pending, workers, done, progress)
    except KeyboardInterrupt:
        raise AnnotationInterrupted(len(done), len(pending), cache.path if cache is not None else None) from None
    for index, outcome in done.items():
        outcomes[index] = outcome

    annotated: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for (number, row), outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, Annotation):
            outcome = _checked_annotation(row, outcome, source, number)
        if isinstance(outcome, Annotation):
            record = outcome.record()
            if "summary_end_idx" in row or "next_sentence_end_idx" in row:
                record["previous"] = [row.get("summary_end_idx"), row.get("next_sentence_end_idx")]
            output = dict(row)
            output.update(
                summary_end_idx=outcome.summary_end_idx,
                next_sentence_end_idx=outcome.next_sentence_end_idx,
                annotation=record,
            )
            annotated.append(output)
            report.annotated += 1
            report.unsure += outcome.unsure
            if outcome.extra.get("cached"):
                report.cached += 1
            attempts = outcome.extra.get("attempts", 0)
            report.requests += attempts
            report.failed_requests += max(attempts - 1, 0)  # every attempt before the one that answered
            if row.get("unsafe") is None and row.get("source") is None:
                report.unlabelled += 1
        else:
            reason = outcome or "not annotated"
            # a line that was not JSON has no fields to keep; a JSON value that is no object is kept as `value`
            base = row if isinstance(row, dict) else {} if isinstance(row, SafeKeyDataError) else {"value": row}
            failed.append({**base, "annotation_error": {"row": number, "reason": reason}})
            report.failed.append((number, reason))
    report.requests += sum(failed_requests)
    report.failed_requests += sum(failed_requests)
    return annotated, failed, report


class AnnotationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `annotate_rows`: how many rows were done, and the cache that keeps the LLM's answers."""

    def __init__(self, done: int, total: int, cache: Path | None):
        self.done, self.total, self.cache = done, total, cache
        super().__init__(f"interrupted after {done} of {total} rows")


def _map_in_threads(
    function: Callable[[int], Any],
    items: list[int],
    workers: int,
    results: dict[int, Any],
    progress: Callable[[int, int], None] | None,
) -> None:
    """`results[item] = function(item)` for every item, on `workers` threads (here, for one).

    The threads are daemons and the main thread only waits on a queue: a Ctrl-C returns at once, the rows not started
    are dropped, and a request in flight either finishes (its answer reaches the cache) or ends with the process,
    instead of holding the exit until every queued request has timed out.
    """
    if workers == 1:
        for item in items:
            results[item] = function(item)
            if progress is not None:
                progress(len(results), len(items))
        return
    tasks: queue.SimpleQueue[int] = queue.SimpleQueue()
    finished: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()
    for item in items:
        tasks.put(item)

    def work() -> None:
        while not stop.is_set():
            try:
                item = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((item, function(item), None))
            except BaseException as error:  # handed to the main thread, which raises it
                finished.put((item, None, error))

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, daemon=True, name="safekey-annotate").start()
    try:
        while len(results) < len(items):
            try:
                item, result, error = finished.get(timeout=0.2)
            except queue.Empty:
                continue
            if error is not None:
                raise error
            results[item] = result
            if progress is not None:
                progress(len(results), len(items))
    finally:
        stop.set()


def _checked_annotation(row: dict[str, Any], annotation: Annotation, source: str, number: int) -> Annotation | str:
    """The annotation, or why the row it makes would fail `data validate` (the label aside: an unlabelled row is
    annotated and reported)."""
    probe = dict(row, summary_end_idx=annotation.summary_end_idx)
    probe["next_sentence_end_idx"] = annotation.next_sentence_end_idx
    if probe.get("unsafe") is None and probe.get("source") is None:
        probe["source"] = ""
    try:
        validate_row(probe, source, number)
    except SafeKeyDataError as error:
        return f"field '{error.field_name}': {error.message}"
    return annotation


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows to a `.jsonl`, `.json` (a list) or `.parquet` file, atomically (a temporary file, then a rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{path}: the output must be a .jsonl, .json or .parquet file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; the output must be a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        if suffix == ".jsonl":
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            temporary.write_bytes(text.encode("utf-8"))
        elif suffix == ".json":
            temporary.write_bytes((json.dumps(rows, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
        else:
            from datasets import Dataset

            Dataset.from_list(rows).to_parquet(str(temporary))
        temporary.replace(path)
    finally:
        # a failed write leaves neither a partial output nor its temporary file behind
        temporary.unlink(missing_ok=True)


def sidecar_path(out: str | Path, kind: str) -> Path:
    """`out.jsonl` -> `out.{kind}.jsonl` beside it (the failed rows, the LLM cache)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{kind}.jsonl")


def annotate_file(
    in_path: str,
    out_path: str,
    method: str = "heuristic",
    settings: LLMSettings | None = None,
    cache_path: str | Path | None = None,
    skip_invalid: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AnnotateReport:
    """Annotate a file into `out_path`; the rows that failed go to `out.failed.jsonl` (removed when none failed).

    The LLM cache is `cache_path`, by default `out.cache.jsonl`: rerunning the same command after an interruption
    sends only the requests whose answers it does not hold.
    """
    cache = None
    if method == "llm":
        cache = AnswerCache(cache_path or sidecar_path(out_path, "cache"))
    annotated, failed, report = annotate_rows(
        read_rows(in_path), method, str(in_path), settings, cache, skip_invalid, progress
    )
    write_rows(out_path, annotated)
    failed_path = sidecar_path(out_path, "failed")
    if failed:
        write_rows(failed_path, failed)
    elif failed_path.is_file():
        failed_path.unlink()  # a stale list from an earlier run would report failures that no longer exist
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with hand annotations


@dataclass
class Agreement:
    """How often the heuristic's K matches a hand annotation: exactly, and within one sentence."""

    rows: int = 0
    exact: int = 0  # both offsets equal
    key_exact: int = 0  # same K sentence
    within_one: int = 0  # K sentence at most one sentence away
    unsure: int = 0
    mismatches: list[tuple[int, int | None, int]] = field(default_factory=list)  # (row, hand K, heuristic K)

    def summary(self) -> str:
        def share(count: int) -> str:
            return f"{count}/{self.rows} ({100 * count / max(self.rows, 1):.1f}%)"

        lines = [
            f"rows: {self.rows}",
            f"exact offsets (U and K): {share(self.exact)}",
            f"same K sentence: {share(self.key_exact)}",
            f"K within one sentence: {share(self.within_one)}",
            f"flagged unsure: {share(self.unsure)}",
        ]
        lines += [
            f"  row {row}: hand K = sentence {hand}, heuristic K = {mine}" for row, hand, mine in self.mismatches
        ]
        return "\n".join(lines)


def heuristic_agreement(path: str) -> Agreement:
    """Compare the heuristic with the hand annotations (`summary_end_idx`, `next_sentence_end_idx`) of a file."""
    result = Agreement()
    for number, row in read_rows(path):
        if isinstance(row, SafeKeyDataError):
            raise row
        _, response, _ = _question_and_response(row, path, number)
        annotation = heuristic_annotation(response)
        hand = key_sentence_of(response, row["next_sentence_end_idx"])
        result.rows += 1
        result.unsure += annotation.unsure
        result.exact += (annotation.summary_end_idx, annotation.next_sentence_end_idx) == (
            row["summary_end_idx"],
            row["next_sentence_end_idx"],
        )
        result.key_exact += hand == annotation.key_sentence
        result.within_one += hand is not None and abs(hand - annotation.key_sentence) <= 1
        if hand != annotation.key_sentence:
            result.mismatches.append((number, hand, annotation.key_sentence))
    return result
