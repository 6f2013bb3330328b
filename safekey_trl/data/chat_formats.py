"""How each reasoning model family renders a reasoning turn, and where the trace and the answer land in it.

A SafeKey row stores its response as `<think>\\n{trace}\\n</think>\\n\\n{answer}` whatever the model. Training must see
the text the model's own chat template renders for that conversation: gpt-oss reads its reasoning in a harmony
`analysis` channel, GLM-4 MoE as `\\n<think>{trace}</think>\\n{answer}`, Nemotron 3 with one newline after `</think>`,
and so on. A [`ChatFormat`] names a family; [`resolve_chat_format`] picks it from `tokenizer.chat_template` by
comparing it with the templates TRL ships (`trl/chat_templates/*.jinja`), or takes it by name. [`render_turn`] then
renders the conversation and returns the character spans of the trace and the answer in the rendered text, so that
character offsets into the response map into it.

Three ways to render the assistant turn, per recognised template:

- `training`: the whole conversation through TRL's `*_training.jinja` variant of the template (it keeps the reasoning
  of the last turn and closes the turn the way the model must learn to), with the reasoning where the template reads
  it.
- `self`: the same through the tokenizer's own template (for templates that render a final turn's reasoning).
- `append`: the template renders only the prompt (it deletes the reasoning of a final turn); the family's assistant
  turn is appended to it, written as the model emits it.

The prompt part is always `apply_chat_template(prompt, add_generation_prompt=True)` with thinking on, byte for byte:
a rendering that does not start with it is an error. A template that reads today's date (`strftime_now`, gpt-oss's
system message) is rendered with the date pinned to [`TEMPLATE_DATE`], so that training does not depend on the day.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

AUTO = "auto"
VERBATIM = "verbatim"
# The date a template's `strftime_now` renders (gpt-oss's "Current date: ..."): the gpt-oss release day
TEMPLATE_DATE = date(2025, 8, 5)

_TRACE_SENTINEL = "SAFEKEY_TRACE_SENTINEL"
_ANSWER_SENTINEL = "SAFEKEY_ANSWER_SENTINEL"


class ChatFormatError(ValueError):
    """A chat template the project cannot render a SafeKey example with, or a rendering that breaks an invariant."""


@dataclass(frozen=True)
class ChatFormat:
    """A reasoning model family: how its chat template takes a reasoning turn.

    Attributes:
        name: The family's name (a recipe's `chat_format`).
        templates: Stems of TRL's shipped templates (`trl/chat_templates/<stem>.jinja`) of this family, each with how
            it renders the turn (`"training"`, `"self"` or `"append"`, see the module docstring).
        reasoning_field: The assistant message field the template reads the reasoning from; `None` when the reasoning
            goes inline in `content` as `<think>\\n{trace}\\n</think>\\n\\n{answer}`.
        assistant_turn: For `append`: the assistant turn after the generation prompt, with `{trace}` and `{answer}`
            placeholders. Its head may overlap the generation prompt's tail (`<think>\\n`), which is not repeated.
        default_mode: How a template named as this family but not recognised is rendered.
        where: Where the reasoning goes, in words (the README's table).
        template_kwargs: Variables passed to the template (thinking on).
    """

    name: str
    templates: dict[str, str]
    reasoning_field: str | None
    default_mode: str
    where: str
    assistant_turn: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=lambda: {"enable_thinking": True})


def _with_training_variants(*stems: str) -> dict[str, str]:
    """Templates whose final turn renders through TRL's `*_training.jinja` variant, and those variants themselves."""
    return {rendered: mode for stem in stems for rendered, mode in ((stem, "training"), (f"{stem}_training", "self"))}


_R1_TURN = "<think>\n{trace}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"

CHAT_FORMATS: dict[str, ChatFormat] = {
    format.name: format
    for format in (
        ChatFormat(
            "r1_distill",
            {"deepseek_r1_distill": "training", "deepseek_r1_distill_training": "self"},
            reasoning_field=None,
            default_mode="append",
            assistant_turn=_R1_TURN,
            where="inline: `<｜Assistant｜><think>\\n{trace}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>`",
        ),
        ChatFormat(
            "deepseek_v3",
            {"deepseekv3": "append", "deepseekv3_training": "append"},
            reasoning_field=None,
            default_mode="append",
            assistant_turn=_R1_TURN,
            where="appended after the generation prompt `<｜Assistant｜><think>\\n` (the template drops it)",
        ),
        ChatFormat(
            "qwen3",
            _with_training_variants("qwen3", "qwen3_5_think", "qwen3_5_nothink", "qwen3_6", "qwen3_8"),
            reasoning_field="reasoning_content",
            default_mode="self",
            where="`reasoning_content`: `<|im_start|>assistant\\n<think>\\n{trace}\\n</think>\\n\\n{answer}`",
        ),
        ChatFormat(
            "gpt_oss",
            _with_training_variants("gptoss"),
            reasoning_field="thinking",
            default_mode="self",
            where="`thinking`: harmony `analysis` channel, the answer in `final`, closed by `<|return|>`",
        ),
        ChatFormat(
            "nemotron_3",
            _with_training_variants(
                "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra", "nemotron_3_5_lightning"
            ),
            reasoning_field="reasoning_content",
            default_mode="self",
            where="`reasoning_content`: `<think>\\n{trace}\\n</think>\\n{answer}` (Ultra, 3.5: `</think>{answer}`)",
        ),
        ChatFormat(
            "glm4_moe",
            _with_training_variants("glm4moe"),
            reasoning_field="reasoning_content",
            default_mode="self",
            where="`reasoning_content`: `<|assistant|>\\n<think>{trace}</think>\\n{answer}<|user|>`",
        ),
        ChatFormat(
            "gemma4",
            {
                "gemma4": "append",
                "gemma4_v2": "append",
                "gemma4_v3": "append",
                "gemma4_v4": "append",
                "gemma4_v5": "self",
            },
            reasoning_field="reasoning_content",
            default_mode="append",
            assistant_turn="<|channel>thought\n{trace}\n<channel|>{answer}<turn|>\n",
            where="`reasoning_content`: `<|channel>thought\\n{trace}\\n<channel|>{answer}` (appended before v5)",
        ),
    )
}
FORMAT_NAMES = (AUTO, *CHAT_FORMATS, VERBATIM)


@functools.cache
def trl_chat_templates() -> dict[str, str]:
    """TRL's shipped chat templates, `{stem: text}`, read from the installed package."""
    directory = resources.files("trl").joinpath("chat_templates")
    return {
        Path(entry.name).stem: entry.read_text(encoding="utf-8")
        for entry in directory.iterdir()
        if entry.name.endswith(".jinja")
    }


@functools.cache
def _known_templates() -> dict[str, tuple[ChatFormat, str, str]]:
    """`{template text: (family, stem, mode)}` for every TRL template of a family this module knows."""
    shipped = trl_chat_templates()
    known = {}
    for format in CHAT_FORMATS.values():
        for stem, mode in format.templates.items():
            if stem in shipped:
                known[shipped[stem].strip()] = (format, stem, mode)
    return known


def template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template (the `default` one of a named set); a clear error when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ChatFormatError("The tokenizer has no chat template: SafeKey renders every example with one.")
    return template


@dataclass(frozen=True)
class ResolvedFormat:
    """A family, bound to a template: which text renders the prompt, and how the assistant turn is rendered."""

    format: ChatFormat | None  # None: verbatim
    mode: str  # "training", "self", "append", or "verbatim"
    prompt_template: str
    render_template: str | None  # the template the whole conversation goes through ("training" / "self")
    template_name: str  # the recognised TRL stem, or a description


def _describe(template: str) -> str:
    first = template.strip().splitlines()[0] if template.strip() else ""
    return f"a {len(template)}-character template starting {first[:60]!r}"


def resolve_chat_format(tokenizer: PreTrainedTokenizerBase, chat_format: str = AUTO) -> ResolvedFormat:
    """Bind a family to the tokenizer's chat template.

    Args:
        tokenizer: The tokenizer whose `chat_template` renders the examples.
        chat_format: `auto` (recognise the template among TRL's shipped ones), a family name (the template is taken to
            be of that family even when not recognised), or `verbatim` (the template renders the prompt and the
            SafeKey response is appended as it is, then the EOS token: the rendering before model families).

    Raises:
        ChatFormatError: an unknown name, or under `auto` a template that is none of the families'.
    """
    if chat_format not in FORMAT_NAMES:
        raise ChatFormatError(f"Unknown chat_format {chat_format!r}; choose one of {', '.join(FORMAT_NAMES)}.")
    template = template_text(tokenizer)
    if chat_format == VERBATIM:
        return ResolvedFormat(None, VERBATIM, template, None, "verbatim")
    known = _known_templates().get(template.strip())
    if known is not None and chat_format in (AUTO, known[0].name):
        format, stem, mode = known
        render = trl_chat_templates()[f"{stem}_training"] if mode == "training" else template
        return ResolvedFormat(format, mode, template, render if mode != "append" else None, stem)
    if known is not None:
        raise ChatFormatError(
            f"chat_format {chat_format!r} names a family, but the tokenizer's chat template is TRL's {known[1]!r}, of "
            f"the {known[0].name} family: use chat_format auto (or {known[0].name!r})."
        )
    if chat_format == AUTO:
        raise ChatFormatError(
            f"The tokenizer's chat template is not one SafeKey recognises ({_describe(template)}): it matches none "
            f"of TRL's templates of the families {', '.join(CHAT_FORMATS)}. Name the family with `chat_format` "
            f"(a recipe field; `--template` on the command line) if the template is one of them, or set "
            f"`chat_format: {VERBATIM}` to append the SafeKey response to the rendered prompt as it is."
        )
    format = CHAT_FORMATS[chat_format]
    mode = format.default_mode
    return ResolvedFormat(format, mode, template, template if mode != "append" else None, f"custom {chat_format}")


def family_template(name: str) -> str:
    """The canonical TRL template of a family (its first listed), or the text of a `.jinja` file."""
    if name in CHAT_FORMATS:
        return trl_chat_templates()[next(iter(CHAT_FORMATS[name].templates))]
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise ChatFormatError(f"--template {name!r}: neither a family ({', '.join(CHAT_FORMATS)}) nor a .jinja file.")


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _pin_date(template: str) -> str:
    # Replace every `strftime_now("<format>")` with the pinned date as a string literal: transformers passes template
    # variables as plain data, so the function itself cannot be swapped
    def literal(match: re.Match) -> str:
        return repr(TEMPLATE_DATE.strftime(match.group(2)))

    return re.sub(r"strftime_now\(\s*([\"'])(.*?)\1\s*\)", literal, template)


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


def _kwargs(resolved: ResolvedFormat) -> dict[str, Any]:
    return dict(resolved.format.template_kwargs) if resolved.format is not None else {}


def render_prompt(
    prompt_messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, resolved: ResolvedFormat
) -> str:
    """The prompt as the model sees it at inference: the generation prompt added, thinking on, the date pinned."""
    return tokenizer.apply_chat_template(
        prompt_messages,
        chat_template=_pin_date(resolved.prompt_template),
        tokenize=False,
        add_generation_prompt=True,
        **_kwargs(resolved),
    )


def _assistant_turn(resolved: ResolvedFormat, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The appended turn's layout (`{trace}`, `{answer}` placeholders), less the head the generation prompt holds."""
    if resolved.mode == VERBATIM:
        layout = "<think>\n{trace}\n</think>\n\n{answer}" + (tokenizer.eos_token or "")
    else:
        layout = resolved.format.assistant_turn
    head = layout.split("{trace}")[0]
    overlap = next((k for k in range(len(head), 0, -1) if prompt.endswith(head[:k])), 0)
    return layout[overlap:]


def _render_full(
    prompt_messages: list[dict[str, str]],
    trace: str,
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    resolved: ResolvedFormat,
    prompt: str,
) -> str:
    if resolved.render_template is None:  # append, verbatim
        turn = _assistant_turn(resolved, tokenizer, prompt)
        return prompt + turn.replace("{trace}", "\0T").replace("{answer}", "\0A").replace("\0T", trace).replace(
            "\0A", answer
        )
    field_name = resolved.format.reasoning_field
    if field_name is None:
        message = {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n{answer}"}
    else:
        message = {"role": "assistant", "content": answer, field_name: trace}
    return tokenizer.apply_chat_template(
        [*prompt_messages, message],
        chat_template=_pin_date(resolved.render_template),
        tokenize=False,
        **_kwargs(resolved),
    )


def _stripped(text: str) -> list[tuple[str, int]]:
    """The forms a template may render a text in (as is, newlines stripped, whitespace stripped), each with the
    number of characters it drops from the head."""
    return [
        (text, 0),
        (text.strip("\n"), len(text) - len(text.lstrip("\n"))),
        (text.strip(), len(text) - len(text.lstrip())),
    ]


def render_turn(
    prompt_messages: list[dict[str, str]],
    trace: str,
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    resolved: ResolvedFormat,
) -> RenderedTurn:
    """Render a conversation ending in a reasoning turn, and locate the trace and the answer in it.

    The layout comes from rendering the same conversation with sentinel strings for the trace and the answer: the
    text before the trace and after the answer are the same in the real rendering, so the trace starts where the
    sentinel did and the answer ends where the sentinel's did (less the same tail). A template may strip newlines or
    whitespace from their ends; any other change is an error, as is a rendering that does not start with the
    inference prompt.
    """
    prompt = render_prompt(prompt_messages, tokenizer, resolved)
    text = _render_full(prompt_messages, trace, answer, tokenizer, resolved, prompt)
    layout = _render_full(prompt_messages, _TRACE_SENTINEL, _ANSWER_SENTINEL, tokenizer, resolved, prompt)
    trace_start = layout.index(_TRACE_SENTINEL)
    tail = layout[layout.index(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL) :]
    fits = text.startswith(prompt) and text[:trace_start] == layout[:trace_start] and text.endswith(tail)
    if not fits and not trace.strip():
        # Templates that drop an empty reasoning (Nemotron 3: `<think></think>`, Gemma 4: no thought channel)
        # contradict their own thinking-on generation prompt: an empty trace is the reasoning turn with nothing in it
        text = layout.replace(_TRACE_SENTINEL, "").replace(_ANSWER_SENTINEL, answer)
    where = f"the {resolved.template_name} rendering ({resolved.mode})"
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
