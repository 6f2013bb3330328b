"""The model family's turn at evaluation, through the same family layer as training (`data.chat_formats`).

- **The prompt** is the one training's examples start with: the family's template with thinking on
  (`enable_thinking`), a template's date pinned (gpt-oss), the generation prompt added.
- **A prefill** is forced where the family's reasoning starts: after the generation prompt and whatever the family's
  turn puts before its trace (`<think>\\n` for Qwen3, the harmony `analysis` channel header for gpt-oss, nothing more
  for R1-Distill, whose generation prompt already opens `<think>\\n`), then the reference's separating space
  ([`PREFILL_SEPARATOR`]; the SafeKey reference's `gen.py` appends `" " + prefill` to the prompt).
- **A response** (what the model wrote, with whatever was forced in front) is split back into its reasoning trace and
  its final answer by the family's own markers (`</think>`, harmony's `final` channel, Gemma 4's `<channel|>`), found
  by rendering a turn with sentinels through `chat_formats.render_turn`. A trace that never closed has no answer.

What a judge reads ([`judged_text`]): the trace, the answer, or both (the reference's `--part think|answer|response`),
in one layout for every family (`<think>\\n{trace}\\n</think>\\n\\n{answer}`), from the end of a forced prefill on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..data import THINK_OPEN
from ..data.chat_formats import AUTO, ResolvedFormat, render_turn, resolve_chat_format
from ..data.chat_formats import render_prompt as render_family_prompt
from .suites import EvalPrompt

# The SafeKey reference's gen.py places the prefill after the prompt as `text += " " + prefill_text`
PREFILL_SEPARATOR = " "
JUDGED_PARTS = ("both", "trace", "answer")
_TRACE, _ANSWER = "SAFEKEYEVALTRACE", "SAFEKEYEVALANSWER"


@dataclass(frozen=True)
class TurnLayout:
    """Where a family's assistant turn puts its trace and its answer, after the generation prompt.

    Attributes:
        family: The family's name (`r1_distill`, `qwen3`, `gpt_oss`, ...) or `verbatim`.
        resolved: The family bound to the tokenizer's template (what training renders with).
        opened: The start of the turn the generation prompt already holds (`<think>\\n` for R1-Distill): a recorded
            response starts with it, as a SafeKey response does.
        head: What the turn puts between the generation prompt and the trace (forced before a prefill).
        leads: The forms of `opened + head` a response may start with (as rendered; without special tokens).
        markers: The forms of the trace/answer boundary a response may hold (as rendered, whitespace stripped;
            without special tokens, as text decoded with `skip_special_tokens` holds it).
        ends: What may close the turn after the answer (the template's tail, the EOS token).
    """

    family: str
    resolved: ResolvedFormat
    opened: str
    head: str
    leads: tuple[str, ...]
    markers: tuple[str, ...]
    ends: tuple[str, ...]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    special = set(tokenizer.all_special_tokens)
    special.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted(special, key=len, reverse=True)


def _without(text: str, tokens: list[str]) -> str:
    for token in tokens:
        text = text.replace(token, "")
    return text


def _forms(*texts: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text for text in texts if text))


def turn_layout(tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO) -> TurnLayout:
    """The layout of the family turn of `tokenizer`'s chat template (or the family `chat_format` names; see
    `chat_formats.resolve_chat_format`), read off one rendering with sentinel trace and answer."""
    resolved = chat_format if isinstance(chat_format, ResolvedFormat) else resolve_chat_format(tokenizer, chat_format)
    return _layout(tokenizer, resolved)


def _layout(tokenizer: PreTrainedTokenizerBase, resolved: ResolvedFormat) -> TurnLayout:
    turn = render_turn([{"role": "user", "content": "Hi"}], _TRACE, _ANSWER, tokenizer, resolved)
    text, prompt_end = turn.text, turn.prompt_end
    (trace_start, trace_end), (answer_start, answer_end) = turn.trace_span, turn.answer_span
    opened = THINK_OPEN if text[:prompt_end].endswith(THINK_OPEN) else ""
    head, separator, tail = text[prompt_end:trace_start], text[trace_end:answer_start], text[answer_end:]
    special = _special_tokens(tokenizer)
    return TurnLayout(
        family=resolved.format.name if resolved.format is not None else "verbatim",
        resolved=resolved,
        opened=opened,
        head=head,
        leads=_forms(opened + head, opened + _without(head, special).strip()),
        markers=_forms(separator.strip(), _without(separator, special).strip()),
        ends=_forms(tail.strip(), tokenizer.eos_token or ""),
    )


@dataclass(frozen=True)
class RenderedPrompt:
    """The text to generate from and the start of the response it already holds (`forced`: the turn's opening the
    generation prompt holds, and a prefill with what the family puts before it), which the recorded response starts
    with. `key` is the prompt's (suite, id)."""

    text: str
    forced: str
    prefill: str | None
    key: tuple[str, str] = ("", "")

    @property
    def judged_from(self) -> int:
        """Where the model's own text starts in the recorded response: after a forced prefill (the attacker's text)."""
        return len(self.forced) if self.prefill else 0


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: EvalPrompt,
    layout: TurnLayout | None = None,
    prefill_separator: str = PREFILL_SEPARATOR,
) -> RenderedPrompt:
    """Render `prompt` as training does (the family's template, thinking on, the date pinned, the generation prompt
    added) and force its prefill where the family's trace starts, after `prefill_separator`, cut to
    `prompt.prefill_tokens` tokens when set. A prefill that repeats the turn's opening is not doubled."""
    layout = layout or turn_layout(tokenizer)
    text = render_family_prompt(prompt.messages, tokenizer, layout.resolved)
    prefill = prompt.prefill or ""
    for lead in (*layout.leads, THINK_OPEN):
        if lead and prefill.startswith(lead):
            prefill = prefill[len(lead) :]
            break
    if prefill and prompt.prefill_tokens is not None:
        ids = tokenizer(prefill, add_special_tokens=False)["input_ids"][: prompt.prefill_tokens]
        prefill = tokenizer.decode(ids, skip_special_tokens=True)
    forced = layout.head + prefill_separator + prefill if prefill else ""
    return RenderedPrompt(text + forced, layout.opened + forced, prefill or None, prompt.key)


@dataclass(frozen=True)
class ResponseParts:
    """Where a response's trace and final answer lie (`[start, end)`, whitespace and the turn's end left out);
    `answer` is None when the trace never closed (the response was cut, or the model never left its reasoning)."""

    trace: tuple[int, int]
    answer: tuple[int, int] | None

    @property
    def closed(self) -> bool:
        return self.answer is not None

    def record(self) -> dict[str, Any]:
        """As result-row fields."""
        return {"trace_span": list(self.trace), "answer_span": list(self.answer) if self.answer else None}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ResponseParts | None:
        trace, answer = row.get("trace_span"), row.get("answer_span")
        return None if trace is None else cls(tuple(trace), tuple(answer) if answer else None)  # type: ignore[arg-type]


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_response(response: str, layout: TurnLayout) -> ResponseParts:
    """Split a recorded response into its trace and its final answer by the family's markers.

    The trace runs from after the turn's opening to the first boundary marker, the answer from after the last one
    to the end less the turn's closing tokens (as the reference's `split('</think>')[0]` and `[-1]`)."""
    start = next((len(lead) for lead in layout.leads if response.startswith(lead)), 0)
    markers = [marker for marker in layout.markers if response.find(marker, start) >= 0]
    if not markers:
        return ResponseParts(_strip_span(response, start, _before_ends(response, start, layout)), None)
    first = min(response.find(marker, start) for marker in markers)
    last, marker = max((response.rfind(marker), marker) for marker in markers)
    answer_start = last + len(marker)
    answer = _strip_span(response, answer_start, _before_ends(response, answer_start, layout))
    return ResponseParts(_strip_span(response, start, first), answer)


def _before_ends(response: str, start: int, layout: TurnLayout) -> int:
    """Where the text ends once the turn's closing tokens (and whitespace) are taken off its tail."""
    end, stripped = len(response), True
    while stripped:
        stripped = False
        body = response[:end].rstrip()
        for closing in layout.ends:
            if body.endswith(closing) and len(body) - len(closing) >= start:
                end, stripped = len(body) - len(closing), True
                break
    return end


def final_text(response: str, parts: ResponseParts, judged_from: int = 0) -> str:
    """The final answer; for a trace that never closed, the trace itself (the reference's `split('</think>')[-1]`
    is then the whole response), from `judged_from` on."""
    start, end = parts.answer if parts.answer is not None else parts.trace
    return response[max(start, judged_from) : end]


def judged_text(response: str, parts: ResponseParts, part: str = "both", judged_from: int = 0) -> str:
    """What a judge reads of a response: the `trace`, the `answer` or `both` (as `<think>\\n{trace}\\n</think>\\n\\n
    {answer}` whatever the family), leaving out what precedes `judged_from` (a forced prefill)."""
    if part not in JUDGED_PARTS:
        raise ValueError(f"Unknown judged part {part!r}: use {', '.join(JUDGED_PARTS)}.")
    trace = response[max(parts.trace[0], judged_from) : parts.trace[1]]
    if part == "trace":
        return trace
    if part == "answer":
        return final_text(response, parts, judged_from)
    if parts.answer is None:
        return f"<think>\n{trace}"
    return f"<think>\n{trace}\n</think>\n\n{response[parts.answer[0] : parts.answer[1]]}"
