"""How each reasoning model family renders a reasoning turn, and where the trace and the answer land in it.

A SafeKey row stores its response as `<think>\\n{trace}\\n</think>\\n\\n{answer}` whatever the model. Training must see
the text the model's own chat template renders for that conversation: gpt-oss reads its reasoning in a harmony
`analysis` channel, GLM-4 MoE as `\\n<think>{trace}</think>\\n{answer}`, Nemotron 3 with one newline after `</think>`,
and so on. One part a module:

- `families`: the family table ([`ChatFormat`], [`CHAT_FORMATS`]), the known templates (TRL's and the package's),
  and the family a recipe declares with `chat_format_turn`.
- `recognition`: [`resolve_chat_format`] picks the family by what the tokenizer's template renders for probe
  conversations (a reformatted copy of a known template is recognised; a near miss is named with the first
  characters where it parts), or takes it by name, or from a declared turn.
- `rendering`: [`render_turn`] renders the conversation and returns the character spans of the trace and the answer
  in the rendered text, so that character offsets into the response map into it ([`map_offset`]).

Three ways to render the assistant turn, per recognised template:

- `training`: the whole conversation through TRL's `*_training.jinja` variant of the template (it keeps the reasoning
  of the last turn and closes the turn the way the model must learn to), with the reasoning where the template reads
  it.
- `self`: the same through the tokenizer's own template (for templates that render a final turn's reasoning).
- `append`: the template renders only the prompt (it deletes the reasoning of a final turn); the family's assistant
  turn (or the recipe's declared one) is appended to it, written as the model emits it.
"""

from .families import (
    AUTO,
    CHAT_FORMATS,
    DECLARED,
    FORMAT_NAMES,
    PACKAGE_TEMPLATES,
    TEMPLATE_DATE,
    VERBATIM,
    ChatFormat,
    ChatFormatError,
    declared_format,
    family_template,
    known_templates,
    trl_chat_templates,
)
from .recognition import PROBES, ResolvedFormat, probe_renderings, recognise, resolve_chat_format, template_text
from .rendering import RenderedTurn, apply_template, map_offset, pin_date, render_prompt, render_turn

__all__ = [
    "AUTO",
    "CHAT_FORMATS",
    "DECLARED",
    "FORMAT_NAMES",
    "PACKAGE_TEMPLATES",
    "PROBES",
    "TEMPLATE_DATE",
    "VERBATIM",
    "ChatFormat",
    "ChatFormatError",
    "RenderedTurn",
    "ResolvedFormat",
    "apply_template",
    "declared_format",
    "family_template",
    "known_templates",
    "map_offset",
    "pin_date",
    "probe_renderings",
    "recognise",
    "render_prompt",
    "render_turn",
    "resolve_chat_format",
    "template_text",
    "trl_chat_templates",
]
