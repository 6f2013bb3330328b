"""Resuming: find the last complete checkpoint of a run, and refuse one written with other SafeKey settings, for
another model, or in the other form (LoRA adapter vs full weights).

Every checkpoint (and the final output) holds `safekey_config.json` beside `safekey_head.safetensors`: the SafeKey
objective's settings it was trained with. Resuming under other settings would silently change the objective half-way
through a run, so it is refused with the differing fields named.

`SafeKeySFTTrainer` writes each checkpoint aside and renames it to `checkpoint-N` once whole, so a `checkpoint-N`
is complete; one without `trainer_state.json`, which the Trainer writes last (a save interrupted by an older version,
or by a copy), is skipped by auto-resume and refused when named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .run_lock import checkpoints

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, without importing the Trainer

SAFEKEY_SETTINGS_NAME = "safekey_config.json"
# The fields that define the SafeKey objective. `lm_head_kernel` is left out: both kernels give the same loss, so a
# run may resume on another device with another kernel.
SAFEKEY_SETTING_FIELDS = (
    "qmm_weight",
    "head_weight",
    "head_theta",
    "auxiliary_epochs",
    "qmm_mask_query",
    "head_detach_hidden",
)
# Values of `resume_from_checkpoint` that mean "the last checkpoint in output_dir, if any"
AUTO_RESUME_VALUES = ("true", "auto")


def safekey_settings(args: Any) -> dict[str, Any]:
    """The SafeKey objective's settings of a [`SafeKeyConfig`], as saved beside every checkpoint."""
    return {name: getattr(args, name) for name in SAFEKEY_SETTING_FIELDS}


def save_safekey_settings(args: Any, directory: str | Path, run: dict[str, Any] | None = None) -> Path:
    """Write `directory/safekey_config.json`: the settings, and under `"run"` what the model card states about the
    run (data, final losses), so that `safekey-trl export` can write the same card."""
    path = Path(directory) / SAFEKEY_SETTINGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {**safekey_settings(args), **({"run": run} if run is not None else {})}
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


def load_safekey_settings(directory: str | Path) -> dict[str, Any] | None:
    """The settings saved in `directory`, or None when it has none (a checkpoint from before they were saved)."""
    path = Path(directory) / SAFEKEY_SETTINGS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def check_checkpoint_settings(checkpoint: str | Path, args: Any) -> None:
    """Raise `ValueError` naming every SafeKey setting in which `checkpoint` differs from `args`."""
    saved = load_safekey_settings(checkpoint)
    if saved is None:
        logger.warning("%s has no %s: its SafeKey settings cannot be checked.", checkpoint, SAFEKEY_SETTINGS_NAME)
        return
    current = safekey_settings(args)
    differences = [
        f"{name}: checkpoint {saved[name]!r}, now {current[name]!r}"
        for name in SAFEKEY_SETTING_FIELDS
        if name in saved and saved[name] != current[name]
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} was trained with other SafeKey settings ({'; '.join(differences)}). Resume with the "
            "checkpoint's settings, or start a new run in another output_dir."
        )


def is_complete_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoint folder was written to the end (the Trainer writes `trainer_state.json` last)."""
    return (Path(directory) / TRAINER_STATE_NAME).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` of `output_dir` (by step), skipping, with a warning, incomplete ones."""
    found = checkpoints(output_dir)
    incomplete = []
    for checkpoint in reversed(found):
        if is_complete_checkpoint(checkpoint):
            break
        incomplete.append(checkpoint.name)
    else:
        checkpoint = None
    if incomplete:
        logger.warning(
            "%s: skipped incomplete checkpoint(s) %s (no %s: their save was interrupted)",
            output_dir,
            ", ".join(incomplete),
            TRAINER_STATE_NAME,
        )
    return str(checkpoint) if checkpoint is not None else None


def check_checkpoint_complete(checkpoint: str | Path) -> None:
    """Raise `ValueError` for a named checkpoint whose save was interrupted, naming the newest complete one (and
    `FileNotFoundError` for one that is not there)."""
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {checkpoint}: no such checkpoint directory")
    if is_complete_checkpoint(checkpoint):
        return
    last = latest_complete_checkpoint(Path(checkpoint).parent)
    raise ValueError(
        f"{checkpoint}: an incomplete checkpoint (no {TRAINER_STATE_NAME}: its save was interrupted)"
        + (f"; the newest complete one is {last}" if last else "")
    )


# The config fields that must match for a checkpoint's weights to be this model's
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_checkpoint_matches(checkpoint: str | Path, model: Any, adapter_config: Any = None) -> None:
    """Raise `ValueError` before any weight loads when `checkpoint` cannot be this run's: a LoRA adapter for a full
    fine-tune or the other way round, another model's weights, or another LoRA shape.

    Args:
        model: The causal LM being trained (without wrappers).
        adapter_config: The run's LoRA config, when it trains an adapter.
    """
    directory = Path(checkpoint)
    has_adapter = (directory / "adapter_config.json").is_file()
    has_model = (directory / "config.json").is_file()
    if adapter_config is None and has_adapter and not has_model:
        raise ValueError(
            f"{checkpoint} holds a LoRA adapter (adapter_config.json), but this run trains the full model: resume "
            "it with `use_peft: true` and the LoRA settings it was trained with, or leave out resume_from_checkpoint "
            "to start a full fine-tune."
        )
    if adapter_config is not None and has_model and not has_adapter:
        raise ValueError(
            f"{checkpoint} holds full model weights (config.json, no adapter_config.json), but this run trains a LoRA "
            "adapter: resume it without `use_peft`, or leave out resume_from_checkpoint to start a LoRA run."
        )
    differences = []
    if has_model and adapter_config is None:
        saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        saved_text = saved.get("text_config") or saved
        current = model.config.get_text_config()
        for name in _SHAPE_FIELDS:
            theirs = saved.get(name) if name == "model_type" else saved_text.get(name)
            ours = model.config.model_type if name == "model_type" else getattr(current, name, None)
            if theirs is not None and ours is not None and theirs != ours:
                differences.append(f"{name}: checkpoint {theirs!r}, model {ours!r}")
    if has_adapter and adapter_config is not None:
        saved = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        for name in ("r", "lora_alpha"):
            theirs, ours = saved.get(name), getattr(adapter_config, name, None)
            if theirs is not None and ours is not None and theirs != ours:
                differences.append(f"LoRA {name}: checkpoint {theirs!r}, now {ours!r}")
    if differences:
        raise ValueError(
            f"{checkpoint} was not written by a run of this model ({'; '.join(differences)}): resume with the model "
            "and settings it was trained with, or start a new run in another output_dir."
        )


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: `value` itself when it is a path; for `True`, `"true"` or `"auto"` the last
    complete `checkpoint-*` in `output_dir`, or None (start fresh, with an info line) when there is none yet."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in AUTO_RESUME_VALUES):
        last = latest_complete_checkpoint(output_dir)
        if last is None:
            logger.info("resume_from_checkpoint=%s: no checkpoint in %s yet, starting fresh.", value, output_dir)
        else:
            logger.info("Resuming from the last checkpoint in %s: %s", output_dir, last)
        return last
    return str(value)
