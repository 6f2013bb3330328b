"""Which family a tokenizer's chat template belongs to, recognised by what it renders.

A template is recognised when it renders a few probe conversations (a user turn; a system and a user turn; a
reasoning turn between two user turns; a conversation ending in a reasoning turn) exactly as a known template of a
family does, so that a copy reformatted or re-indented, or saved by another tool, is recognised like the original.
A template that matches none is an error naming the closest known one and the first characters where their
renderings part. [`resolve_chat_format`] binds the recognised (or named, or declared) family to the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .families import (
    AUTO,
    CHAT_FORMATS,
    DECLARED,
    FORMAT_NAMES,
    VERBATIM,
    ChatFormat,
    ChatFormatError,
    declared_format,
    known_templates,
)
from .rendering import _common_prefix, apply_template

_QUESTION = "How do I reset a forgotten password?"
_REASONING = "The user wants to reset a password. The sign-in page has a link for it."
_ANSWER = "Use the reset link on the sign-in page."
# A reasoning turn with the reasoning in each field a family reads it from, and one with it inline in `content`
_FIELD_TURN = {"role": "assistant", "content": _ANSWER, "reasoning_content": _REASONING, "thinking": _REASONING}
_INLINE_TURN = {"role": "assistant", "content": f"<think>\n{_REASONING}\n</think>\n\n{_ANSWER}"}
_USER = {"role": "user", "content": _QUESTION}
# (what the conversation is, its turns, whether the generation prompt is added)
PROBES: tuple[tuple[str, list[dict[str, str]], bool], ...] = (
    ("a user turn, with the generation prompt", [_USER], True),
    (
        "a system and a user turn, with the generation prompt",
        [{"role": "system", "content": "You are a careful assistant."}, _USER],
        True,
    ),
    (
        "a user turn, a reasoning turn and a user turn, with the generation prompt",
        [_USER, _FIELD_TURN, {"role": "user", "content": "And on a phone?"}],
        True,
    ),
    ("a user turn and a reasoning turn (the reasoning in its field)", [_USER, _FIELD_TURN], False),
    ("a user turn and a reasoning turn (the reasoning inline)", [_USER, _INLINE_TURN], False),
)


@dataclass(frozen=True)
class ResolvedFormat:
    """A family, bound to a template: which text renders the prompt, how the assistant turn is rendered, and the
    template variables both are rendered with."""

    format: ChatFormat | None  # None: verbatim
    mode: str  # "training", "self", "append", or "verbatim"
    prompt_template: str
    render_template: str | None  # the template the whole conversation goes through ("training" / "self")
    template_name: str  # the recognised stem, or a description
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def template_text(tokenizer) -> str:
    """The tokenizer's chat template (the `default` one of a named set); a clear error when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ChatFormatError("The tokenizer has no chat template: SafeKey renders every example with one.")
    return template


_RENDERINGS: dict[tuple, tuple[str, ...]] = {}


def probe_renderings(tokenizer, template: str, template_kwargs: dict[str, Any]) -> tuple[str, ...]:
    """What `template` renders for each probe conversation (an exception's text where it raises one), with the
    tokenizer's special tokens; cached by the template, those tokens and the variables."""
    key = (template, repr(sorted(tokenizer.special_tokens_map.items())), json.dumps(template_kwargs, sort_keys=True))
    if key not in _RENDERINGS:
        rendered = []
        for _, messages, add_generation_prompt in PROBES:
            try:
                rendered.append(apply_template(tokenizer, template, messages, template_kwargs, add_generation_prompt))
            except Exception as error:  # a template may refuse a probe (roles, a system turn): that is its rendering
                rendered.append(f"<raises {type(error).__name__}: {error}>")
        _RENDERINGS[key] = tuple(rendered)
    return _RENDERINGS[key]


@dataclass(frozen=True)
class Recognised:
    """A known template the tokenizer's renders like: its family, its stem and how it renders the turn."""

    format: ChatFormat
    stem: str
    mode: str


def _candidates() -> list[Recognised]:
    known = known_templates()
    return [
        Recognised(format, stem, mode)
        for format in CHAT_FORMATS.values()
        for stem, mode in format.templates.items()
        if stem in known
    ]


def recognise(tokenizer, template: str, template_kwargs: dict[str, Any]) -> tuple[Recognised | None, str]:
    """The known template `template` renders like, or None and a description of the closest one: how many probe
    conversations render the same, and where the first that does not parts from it."""
    known = known_templates()
    candidates = _candidates()
    for candidate in candidates:  # the same text: no need to render
        if known[candidate.stem].strip() == template.strip():
            return candidate, ""
    ours = probe_renderings(tokenizer, template, template_kwargs)
    best, best_score = None, (-1, -1)
    for candidate in candidates:
        theirs = probe_renderings(tokenizer, known[candidate.stem], template_kwargs)
        if theirs == ours:
            return candidate, ""
        score = (sum(a == b for a, b in zip(ours, theirs, strict=True)), sum(map(_common_prefix, ours, theirs)))
        if score > best_score:
            best, best_score = candidate, score
    theirs = probe_renderings(tokenizer, known[best.stem], template_kwargs)
    index = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    at = _common_prefix(ours[index], theirs[index])
    start = max(at - 30, 0)
    return None, (
        f"the closest is {best.stem!r} ({best.format.name}): {best_score[0]} of {len(PROBES)} probe conversations "
        f"render the same; {PROBES[index][0]} parts from it at character {at}: this template renders "
        f"{ours[index][start : at + 30]!r} where {best.stem} renders {theirs[index][start : at + 30]!r}"
    )


def _describe(template: str) -> str:
    first = template.strip().splitlines()[0] if template.strip() else ""
    return f"a {len(template)}-character template starting {first[:60]!r}"


def _check_declared_turn(format: ChatFormat, tokenizer) -> None:
    """A declared turn must end the way the model learns to stop: with a special or added token after the answer."""
    tail = format.assistant_turn.split("{answer}", 1)[1]
    markers = [token for token in {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()} if token]
    if not any(marker in tail for marker in markers):
        raise ChatFormatError(
            f"chat_format_turn {format.assistant_turn!r} ends with {tail!r} after the answer, which holds none of "
            f"the tokenizer's special tokens: the model would never learn to stop. End the turn with the EOS token "
            f"({tokenizer.eos_token!r}) or the template's end-of-turn token."
        )


def resolve_chat_format(
    tokenizer,
    chat_format: str = AUTO,
    turn: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> ResolvedFormat:
    """Bind a family to the tokenizer's chat template.

    Args:
        tokenizer: The tokenizer whose `chat_template` renders the examples.
        chat_format: `auto` (recognise the template by what it renders), a family name (the template is taken to be
            of that family even when not recognised), or `verbatim` (the template renders the prompt and the SafeKey
            response is appended as it is, then the EOS token: the rendering before model families).
        turn: A recipe's `chat_format_turn`: the assistant turn as the model writes it after the template's
            generation prompt (`{trace}`, `{answer}` placeholders). It declares the family; `chat_format` stays
            `auto`.
        template_kwargs: Template variables (`reasoning_effort`, ...), over the family's own (thinking on).

    Raises:
        ChatFormatError: an unknown name, a declared turn that breaks the rules, or under `auto` a template that
            renders like none of the known ones (the closest is named).
    """
    if chat_format not in FORMAT_NAMES:
        raise ChatFormatError(f"Unknown chat_format {chat_format!r}; choose one of {', '.join(FORMAT_NAMES)}.")
    template = template_text(tokenizer)
    user_kwargs = dict(template_kwargs or {})
    if turn is not None:
        if chat_format != AUTO:
            raise ChatFormatError(
                f"chat_format {chat_format!r} and chat_format_turn both say how the assistant turn is rendered: "
                "set one of them."
            )
        format = declared_format(turn)
        _check_declared_turn(format, tokenizer)
        return ResolvedFormat(format, "append", template, None, DECLARED, {**format.template_kwargs, **user_kwargs})
    if chat_format == VERBATIM:
        return ResolvedFormat(None, VERBATIM, template, None, VERBATIM, user_kwargs)
    kwargs = {"enable_thinking": True, **user_kwargs}
    recognised, closest = recognise(tokenizer, template, kwargs)
    if recognised is not None and chat_format in (AUTO, recognised.format.name):
        format, stem, mode = recognised.format, recognised.stem, recognised.mode
        kwargs = {**format.template_kwargs, **user_kwargs}
        render = known_templates()[f"{stem}_training"] if mode == "training" else template
        return ResolvedFormat(format, mode, template, render if mode != "append" else None, stem, kwargs)
    if recognised is not None:
        raise ChatFormatError(
            f"chat_format {chat_format!r} names a family, but the tokenizer's chat template renders as "
            f"{recognised.stem!r}, of the {recognised.format.name} family: use chat_format auto (or "
            f"{recognised.format.name!r})."
        )
    if chat_format == AUTO:
        raise ChatFormatError(
            f"The tokenizer's chat template is not one SafeKey recognises ({_describe(template)}): it renders like "
            f"none of the known templates of the families {', '.join(CHAT_FORMATS)}; {closest}. Name the family "
            f"with `chat_format` (a recipe field; `--template` on the command line) if the template is one of them, "
            f"declare the assistant turn as the model writes it with `chat_format_turn` (e.g. "
            f"'<think>{{trace}}</think>{{answer}}<|im_end|>', appended after the template's generation prompt), or "
            f"set `chat_format: {VERBATIM}` to append the SafeKey response to the rendered prompt as it is."
        )
    format = CHAT_FORMATS[chat_format]
    mode = format.default_mode
    return ResolvedFormat(
        format,
        mode,
        template,
        template if mode != "append" else None,
        f"custom {chat_format}",
        {**format.template_kwargs, **user_kwargs},
    )
