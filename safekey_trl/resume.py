"""Resuming: find the last checkpoint of a run, and refuse one written with other SafeKey settings.

Every checkpoint (and the final output) holds `safekey_config.json` beside `safekey_head.safetensors`: the SafeKey
objective's settings it was trained with. Resuming under other settings would silently change the objective half-way
through a run, so it is refused with the differing fields named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

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


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: `value` itself when it is a path; for `True`, `"true"` or `"auto"` the last
    `checkpoint-*` in `output_dir`, or None (start fresh, with an info line) when there is none yet."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in AUTO_RESUME_VALUES):
        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if last is None:
            logger.info("resume_from_checkpoint=%s: no checkpoint in %s yet, starting fresh.", value, output_dir)
        else:
            logger.info("Resuming from the last checkpoint in %s: %s", output_dir, last)
        return last
    return str(value)
