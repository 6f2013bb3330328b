"""Rendering a conversation that ends in a reasoning turn, and locating the trace and the answer in the text.

The prompt part is always `apply_chat_template(prompt, add_generation_prompt=True)` with thinking on, byte for byte:
a rendering that does not start with it is an error. A template that reads today's date (`strftime_now`, gpt-oss's
system message) is rendered with the date pinned to [`TEMPLATE_DATE`], so that training does not depend on the day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .families import ANSWER, DECLARED, TEMPLATE_DATE, TRACE, VERBATIM, ChatFormatError

if TYPE_CHECKING:
    from .recognition import ResolvedFormat

_TRACE_SENTINEL = "SAFEKEY_TRACE_SENTINEL"
_ANSWER_SENTINEL = "SAFEKEY_ANSWER_SENTINEL"


def pin_date(template: str) -> str:
    """The template with every `strftime_now("<format>")` replaced by the pinned date as a string literal
    (transformers passes template variables as plain data, so the function itself cannot be swapped)."""

    def literal(match: re.Match) -> str:
        return repr(TEMPLATE_DATE.strftime(match.group(2)))

    return re.sub(r"strftime_now\(\s*([\"'])(.*?)\1\s*\)", literal, template)


def apply_template(
    tokenizer,
    template: str,
    messages: list[dict[str, Any]],
    template_kwargs: dict[str, Any],
    add_generation_prompt: bool = False,
) -> str:
    """`tokenizer.apply_chat_template` of `messages` through `template` as text, the date pinned."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=pin_date(template),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )


@dataclass
class RenderedTurn:
    """A conversation rendered with its reasoning turn: the text, where the prompt ends, and the character spans of
    the trace and of the answer in it (`[start, end)`; whitespace a template strips from their ends is outside)."""

    text: str
    prompt_end: int
    trace_span: tuple[int, int]
    answer_span: tuple[int, int]
    trace_lead: int = 0  # characters the template stripped from the head of the trace
    answer_lead: int = 0  # ... and of the answer


def render_prompt(prompt_messages: list[dict[str, str]], tokenizer, resolved: ResolvedFormat) -> str:
    """The prompt as the model sees it at inference: the generation prompt added, thinking on, the date pinned."""
    return apply_template(tokenizer, resolved.prompt_template, prompt_messages, resolved.template_kwargs, True)


def _assistant_turn(resolved: ResolvedFormat, tokenizer, prompt: str) -> str:
    """The appended turn's layout (`{trace}`, `{answer}` placeholders), less the head the generation prompt holds."""
    if resolved.mode == VERBATIM:
        layout = "<think>\n{trace}\n</think>\n\n{answer}" + (tokenizer.eos_token or "")
    else:
        layout = resolved.format.assistant_turn
    head = layout.split(TRACE)[0]
    overlap = next((k for k in range(len(head), 0, -1) if prompt.endswith(head[:k])), 0)
    if resolved.format is not None and resolved.format.name == DECLARED and not overlap and head.strip():
        if prompt.rstrip().endswith(head.strip()):
            raise ChatFormatError(
                f"chat_format_turn opens with {head!r}, which the generation prompt already holds (it ends "
                f"{prompt[-20:]!r}): start the turn where the generation prompt ends, e.g. "
                f"{layout[len(head) :]!r}, or repeat the prompt's tail exactly."
            )
    return layout[overlap:]


def _render_full(
    prompt_messages: list[dict[str, str]],
    trace: str,
    answer: str,
    tokenizer,
    resolved: ResolvedFormat,
    prompt: str,
) -> str:
    if resolved.render_template is None:  # append, verbatim
        turn = _assistant_turn(resolved, tokenizer, prompt)
        return prompt + turn.replace(TRACE, "\0T").replace(ANSWER, "\0A").replace("\0T", trace).replace("\0A", answer)
    field_name = resolved.format.reasoning_field
    if field_name is None:
        message = {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n{answer}"}
    else:
        message = {"role": "assistant", "content": answer, field_name: trace}
    return apply_template(
        tokenizer, resolved.render_template, [*prompt_messages, message], resolved.template_kwargs, False
    )


def _stripped(text: str) -> list[tuple[str, int]]:
    """The forms a template may render a text in (as is, newlines stripped, whitespace stripped), each with the
    number of characters it drops from the head."""
    return [
        (text, 0),
        (text.strip("\n"), len(text) - len(text.lstrip("\n"))),
        (text.strip(), len(text) - len(text.lstrip())),
    ]


def _check_layout(layout: str, prompt: str, where: str) -> None:
    """A template that drops the final turn's reasoning (or answer) leaves nothing to place U and K in."""
    missing = [
        name
        for name, sentinel in (("reasoning", _TRACE_SENTINEL), ("answer", _ANSWER_SENTINEL))
        if (sentinel not in layout)
    ]
    if not missing:
        return
    final_turn = layout[len(prompt) :] if layout.startswith(prompt) else layout[-200:]
    final_turn = final_turn.replace(_TRACE_SENTINEL, TRACE).replace(_ANSWER_SENTINEL, ANSWER)
    raise ChatFormatError(
        f"{where}: the template drops the {' and the '.join(missing)} of a conversation's final assistant turn (it "
        f"renders that turn as {final_turn[:200]!r}), so the reasoning SafeKey trains on cannot be placed in it. "
        "Some templates do this on purpose (Kimi-K2-Thinking's renders `<think></think>` there). Declare the turn "
        "as the model writes it after the generation prompt with `chat_format_turn` (e.g. "
        "'<think>{trace}</think>{answer}<|im_end|>'), or set `chat_format: verbatim` to append the SafeKey response "
        "as it is."
    )


def render_turn(
    prompt_messages: list[dict[str, str]],
    trace: str,
    answer: str,
    tokenizer,
    resolved: ResolvedFormat,
) -> RenderedTurn:
    """Render a conversation ending in a reasoning turn, and locate the trace and the answer in it.

    The layout comes from rendering the same conversation with sentinel strings for the trace and the answer: the
    text before the trace and after the answer are the same in the real rendering, so the trace starts where the
    sentinel did and the answer ends where the sentinel's did (less the same tail). A template may strip newlines or
    whitespace from their ends; any other change is an error, as is a rendering that does not start with the
    inference prompt, or one that drops the trace or the answer.
    """
    prompt = render_prompt(prompt_messages, tokenizer, resolved)
    where = f"the {resolved.template_name} rendering ({resolved.mode})"
    layout = _render_full(prompt_messages, _TRACE_SENTINEL, _ANSWER_SENTINEL, tokenizer, resolved, prompt)
    _check_layout(layout, prompt, where)
    text = _render_full(prompt_messages, trace, answer, tokenizer, resolved, prompt)
    trace_start = layout.index(_TRACE_SENTINEL)
    tail = layout[layout.index(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL) :]
    fits = text.startswith(prompt) and text[:trace_start] == layout[:trace_start] and text.endswith(tail)
    if not fits and not trace.strip():
        # Templates that drop an empty reasoning (Nemotron 3: `<think></think>`, Gemma 4: no thought channel)
        # contradict their own thinking-on generation prompt: an empty trace is the reasoning turn with nothing in it
        text = layout.replace(_TRACE_SENTINEL, "").replace(_ANSWER_SENTINEL, answer)
    if not text.startswith(prompt):
        raise ChatFormatError(
            f"{where} of the conversation does not start with the prompt the template renders at inference "
            f"(add_generation_prompt=True): they part at character {_common_prefix(text, prompt)}, "
            f"{text[len(prompt) - 20 : len(prompt) + 20]!r} against {prompt[-40:]!r}."
        )
    if text[:trace_start] != layout[:trace_start] or not text.endswith(tail):
        raise ChatFormatError(
            f"{where}: the text around the reasoning turn changes with its content; cannot place it."
        )
    answer_end = len(text) - len(tail)
    answer_start, answer_lead = _locate_answer(text, answer, answer_end, where)
    trace_end, trace_lead = _locate_trace(text, trace, trace_start, answer_start, where)
    return RenderedTurn(
        text, len(prompt), (trace_start, trace_end), (answer_start, answer_end), trace_lead, answer_lead
    )


def _locate_answer(text: str, answer: str, answer_end: int, where: str) -> tuple[int, int]:
    """Where the rendered answer starts, and how many head characters the template stripped from it."""
    for form, lead in _stripped(answer):
        if text[:answer_end].endswith(form):
            return answer_end - len(form), lead
    raise ChatFormatError(f"{where}: the answer is not rendered as it is (nor with its ends stripped).")


def _locate_trace(text: str, trace: str, trace_start: int, answer_start: int, where: str) -> tuple[int, int]:
    """Where the rendered trace ends, and how many head characters the template stripped from it."""
    if not trace.strip():
        return trace_start, 0
    for form, lead in _stripped(trace):
        if text.startswith(form, trace_start) and trace_start + len(form) <= answer_start:
            return trace_start + len(form), lead
    raise ChatFormatError(f"{where}: the reasoning trace is not rendered as it is (nor with its ends stripped).")


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def map_offset(offset: int, trace_bounds: tuple[int, int], answer_start: int, turn: RenderedTurn) -> int:
    """Map a character offset into the SafeKey response to the rendered text.

    `trace_bounds` are the trace's `[start, end)` in the response and `answer_start` where the answer begins there.
    An offset in the trace (its end included) maps into the rendered trace, one in the answer into the rendered
    answer, counting off what the template stripped from their heads and clamping to what it kept; one between the
    trace and the answer (in `\\n</think>\\n\\n`), or in an empty trace, maps to the rendered answer's start.
    """
    trace_start, trace_end = trace_bounds
    rendered_trace_start, rendered_trace_end = turn.trace_span
    rendered_answer_start, rendered_answer_end = turn.answer_span
    if offset <= trace_end and rendered_trace_end > rendered_trace_start:
        mapped = rendered_trace_start + offset - trace_start - turn.trace_lead
        return min(max(mapped, rendered_trace_start), rendered_trace_end)
    if offset < answer_start:
        return rendered_answer_start
    mapped = rendered_answer_start + offset - answer_start - turn.answer_lead
    return min(max(mapped, rendered_answer_start), rendered_answer_end)
