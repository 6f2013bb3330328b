"""The family table: each reasoning model family, the templates of it SafeKey knows, and how each renders a
reasoning turn; and a family a recipe declares itself with `chat_format_turn`.

Templates come from TRL (`trl/chat_templates/*.jinja`) where TRL ships them, else from the package
(`safekey_trl/templates/<stem>.jinja`: Phi-4-reasoning's and OLMo-3-Think's, copied from the models' releases).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

AUTO = "auto"
VERBATIM = "verbatim"
DECLARED = "declared"  # the family a recipe's `chat_format_turn` declares
# The date a template's `strftime_now` renders (gpt-oss's "Current date: ..."): the gpt-oss release day
TEMPLATE_DATE = date(2025, 8, 5)
# The placeholders of an assistant turn's layout
TRACE, ANSWER = "{trace}", "{answer}"


class ChatFormatError(ValueError):
    """A chat template the project cannot render a SafeKey example with, or a rendering that breaks an invariant."""


@dataclass(frozen=True)
class ChatFormat:
    """A reasoning model family: how its chat template takes a reasoning turn.

    Attributes:
        name: The family's name (a recipe's `chat_format`).
        templates: Stems of the known templates of this family (TRL's `trl/chat_templates/<stem>.jinja`, or the
            package's `safekey_trl/templates/<stem>.jinja`), each with how it renders the turn: `"training"` (the
            conversation through TRL's `<stem>_training.jinja` variant), `"self"` (through the template itself) or
            `"append"` (the template renders the prompt; `assistant_turn` is appended).
        reasoning_field: The assistant message field the template reads the reasoning from; `None` when the reasoning
            goes inline in `content` as `<think>\\n{trace}\\n</think>\\n\\n{answer}`.
        default_mode: How a template named as this family but not recognised is rendered.
        where: Where the reasoning goes, in words (the README's table).
        assistant_turn: For `append`: the assistant turn after the generation prompt, with `{trace}` and `{answer}`
            placeholders. Its head may overlap the generation prompt's tail (`<think>\\n`), which is not repeated.
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
        # Phi-4-reasoning (and -plus): the template renders an assistant turn's content as it is, after its fixed
        # reasoning system prompt (a user's system message is dropped)
        ChatFormat(
            "phi4_reasoning",
            {"phi4_reasoning": "self"},
            reasoning_field=None,
            default_mode="self",
            where="inline: `<|im_start|>assistant<|im_sep|><think>\\n{trace}\\n</think>\\n\\n{answer}<|im_end|>`",
        ),
        # OLMo-3-Think: the generation prompt opens `<think>`; the final assistant turn's content is rendered as it
        # is and closed by the EOS token
        ChatFormat(
            "olmo3_think",
            {"olmo3_think": "self"},
            reasoning_field=None,
            default_mode="self",
            where="inline: `<|im_start|>assistant\\n<think>\\n{trace}\\n</think>\\n\\n{answer}` then the EOS token",
        ),
    )
}
FORMAT_NAMES = (AUTO, *CHAT_FORMATS, VERBATIM)
# The templates the package carries (TRL ships the others), `safekey_trl/templates/<stem>.jinja`
PACKAGE_TEMPLATES = ("phi4_reasoning", "olmo3_think")


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
def known_templates() -> dict[str, str]:
    """Every template SafeKey knows, `{stem: text}`: TRL's, and the ones the package carries."""
    package = resources.files("safekey_trl").joinpath("templates")
    carried = {stem: package.joinpath(f"{stem}.jinja").read_text(encoding="utf-8") for stem in PACKAGE_TEMPLATES}
    return {**trl_chat_templates(), **carried}


def family_template(name: str) -> str:
    """The canonical template of a family (its first listed), or the text of a `.jinja` file."""
    if name in CHAT_FORMATS:
        return known_templates()[next(iter(CHAT_FORMATS[name].templates))]
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        template = path.read_text(encoding="utf-8")
        from jinja2 import TemplateSyntaxError
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:  # compiled as transformers compiles it, so that a broken file is named with Jinja's own error
            _compile_jinja_template(template)
        except TemplateSyntaxError as error:
            raise ChatFormatError(
                f"--template {name}: not a valid Jinja template: {error.message} (line {error.lineno})"
            ) from None
        return template
    raise ChatFormatError(f"--template {name!r}: neither a family ({', '.join(CHAT_FORMATS)}) nor a .jinja file.")


def declared_format(turn: str) -> ChatFormat:
    """The family a recipe declares with `chat_format_turn`: its assistant turn, appended after the template's own
    generation prompt (whose tail, e.g. `<think>`, the turn's head may repeat: it is not doubled).

    The turn holds `{trace}` once, then `{answer}` once; anything else is an error naming what is wrong.
    """
    placeholders = re.findall(r"\{(?:trace|answer)\}", turn)
    if placeholders != [TRACE, ANSWER]:
        raise ChatFormatError(
            f"chat_format_turn {turn!r} must hold {TRACE} once and then {ANSWER} once (found "
            f"{', '.join(placeholders) or 'neither'}), e.g. '<think>{{trace}}</think>{{answer}}<|im_end|>'."
        )
    return ChatFormat(
        DECLARED,
        {},
        reasoning_field=None,
        default_mode="append",
        where=f"declared: `{turn}`",
        assistant_turn=turn,
    )
