"""One flag style for `safekey-trl`: TRL's.

`trl sft` spells its flags with underscores (`--max_length`, `--skip_invalid true`) and takes the recipe as
`--config`. Every `safekey-trl` command does the same: its options are shown with underscores, the dashed spellings
they had (`--max-length`, `--skip-invalid`) still work as hidden aliases, and a boolean flag takes TRL's optional
value (`--skip_invalid true`, `--skip_invalid false`) as well as its bare form. `train --help` lists the recipe's
SafeKey fields with their defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from typer.core import TyperCommand, TyperGroup

TRUE_VALUES = ("true", "1", "yes", "y", "on")
FALSE_VALUES = ("false", "0", "no", "n", "off")
SFT_CONFIG_DOCS = "https://huggingface.co/docs/trl/sft_trainer"
TRL_DOCS = "https://huggingface.co/docs/trl"


def underscore_option(name: str) -> str:
    """An option name in TRL's style: `max-length` -> `max_length`. Click applies it to every option name it reads
    and declares (`token_normalize_func`), so the dashed spelling and the underscored one are the same option."""
    return name.replace("-", "_")


def _underscored(opt: str) -> str:
    return "--" + underscore_option(opt[2:]) if opt.startswith("--") else opt


def _bool_flags(command: Any) -> dict[str, tuple[str, str | None]]:
    """For each spelling of a boolean flag of `command`: its (on, off) option names, in underscored form."""
    flags: dict[str, tuple[str, str | None]] = {}
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) and getattr(param, "is_bool_flag", False) and not param.count:
            on = next((opt for opt in param.opts if opt.startswith("--")), None)
            off = next((opt for opt in param.secondary_opts if opt.startswith("--")), None)
            if on is not None:
                flags[_underscored(on)] = (_underscored(on), _underscored(off) if off else None)
    return flags


def trl_bool_values(command: Any, args: list[str]) -> list[str]:
    """Rewrite TRL's `--flag true|false` (or `--flag=false`) into the flag, or its `--no_flag` form, for `command`'s
    boolean flags; everything else is left as it is."""
    flags = _bool_flags(command)
    output: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        name, has_value, inline = token.partition("=")
        flag = flags.get(_underscored(name)) if name.startswith("--") else None
        value = inline if has_value else (args[index + 1] if index + 1 < len(args) else None)
        if flag is not None and value is not None and value.lower() in (*TRUE_VALUES, *FALSE_VALUES):
            on, off = flag
            if value.lower() in TRUE_VALUES:
                output.append(on)
            elif off is not None:
                output.append(off)
            index += 1 if has_value else 2
            continue
        output.append(token)
        index += 1
    return output


class TrlStyleGroup(TyperGroup):
    """A command group whose commands show their options with underscores and read TRL's boolean values."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            for param in getattr(command, "params", []):
                if param.param_type_name == "option":
                    param.opts = [_underscored(opt) for opt in param.opts]
                    param.secondary_opts = [_underscored(opt) for opt in param.secondary_opts]

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, args = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, TyperGroup):
            args = trl_bool_values(command, args)
        return name, command, args


TRL_STYLE = {"cls": TrlStyleGroup, "context_settings": {"token_normalize_func": underscore_option}}


class RecipeHelpCommand(TyperCommand):
    """`train`: its help ends with the recipe's fields ([`recipe_fields_help`]), read from TRL's and SafeKey's configs
    only when the help is shown, so that defining the command imports neither."""

    @property
    def epilog(self) -> str:
        return recipe_fields_help()

    @epilog.setter
    def epilog(self, value: str | None) -> None:  # Click sets it at construction; the property computes it
        pass


def recipe_fields_help() -> str:
    """The `train --help` epilog: the recipe's SafeKey and data fields with their defaults, and where the others are
    documented."""
    from trl import SFTConfig

    from .config import SafeKeyConfig, SafeKeyScriptArguments

    sft_fields = {field.name for field in dataclasses.fields(SFTConfig)}
    sections = [
        ("SafeKey fields (SafeKeyConfig)", [f for f in dataclasses.fields(SafeKeyConfig) if f.name not in sft_fields]),
        (
            "Data fields (SafeKeyScriptArguments)",
            [f for f in dataclasses.fields(SafeKeyScriptArguments) if f.name != "streaming"],  # not supported
        ),
    ]
    lines = ["Recipe fields, set in the recipe or overridden after it as --field value:", ""]
    for title, fields in sections:
        lines += [f"{title}:", ""]
        for field in fields:
            default = field.default if field.default is not dataclasses.MISSING else "[]"
            help_text = field.metadata.get("help", "")
            lines.append(f"  --{field.name} (default: {default}): {help_text}")
        lines.append("")
    lines.append(
        "Every other field of TRL's SFTConfig (learning_rate, num_train_epochs, max_length, output_dir, report_to, "
        f"push_to_hub, ...: {SFT_CONFIG_DOCS}) and of its ModelConfig (model_name_or_path, dtype, use_peft, lora_r, "
        f"load_in_4bit, ...: {TRL_DOCS}) works the same way."
    )
    return "\n".join(lines)
