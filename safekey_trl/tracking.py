"""Experiment trackers: the SafeKey terms in their own panel, and a clear start-up error for a missing tracker.

transformers' trackio and wandb callbacks put every logged value under `train/` (`eval/` for evaluation). SafeKey's
per-term values are sent under `safekey/` (`safekey_eval/`) instead, so that a tracker shows them as one panel
(`safekey/qmm_loss`, `safekey/head_loss`, `safekey/qmm_key_accuracy`, ...); the console and `log_history` keep the
plain names.
"""

from __future__ import annotations

import importlib.util
from typing import Any

# The values `SafeKeySFTTrainer.log` adds beside TRL's metrics
SAFEKEY_TERMS = ("lm_loss", "qmm_loss", "qmm_key_accuracy", "head_loss", "head_accuracy")
# report_to name -> (the package to import, the pip command that installs it)
TRACKERS = {
    "trackio": ("trackio", "pip install 'safekey-trl[track]'  (or: pip install trackio)"),
    "wandb": ("wandb", "pip install wandb"),
}
# The transformers callbacks, and the attribute holding the tracker module each one logs through
_TRACKER_ATTRIBUTES = {"TrackioCallback": "_trackio", "WandbCallback": "_wandb"}


def check_trackers_installed(report_to: list[str] | str | None) -> None:
    """Raise `ImportError`, saying how to install it, for a tracker in `report_to` that is not installed: at
    start-up, before a model is loaded, rather than when the trainer is built."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None:
            raise ImportError(
                f"report_to asks for {name}, which is not installed. Install it with `{TRACKERS[name][1]}`, "
                "or override the recipe with `--report_to none`."
            )


def tracker_key(key: str) -> str:
    """The name a tracker shows for a logged key: SafeKey's terms under `safekey/` (`safekey_eval/`)."""
    for prefix, panel in (("train/", "safekey/"), ("eval/", "safekey_eval/")):
        if key.startswith(prefix) and key[len(prefix) :] in SAFEKEY_TERMS:
            return panel + key[len(prefix) :]
    return key


class _SafeKeyPanel:
    """A tracker module (trackio, wandb) whose `log` renames SafeKey's terms; everything else passes through."""

    def __init__(self, tracker: Any):
        self._tracker = tracker

    def log(self, data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self._tracker.log({tracker_key(key): value for key, value in data.items()}, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


def route_safekey_terms(callbacks: list[Any]) -> int:
    """Make the trackio and wandb callbacks among `callbacks` log SafeKey's terms under `safekey/`; returns how
    many it rerouted."""
    routed = 0
    for callback in callbacks:
        attribute = _TRACKER_ATTRIBUTES.get(type(callback).__name__)
        tracker = getattr(callback, attribute, None) if attribute else None
        if tracker is not None and not isinstance(tracker, _SafeKeyPanel):
            setattr(callback, attribute, _SafeKeyPanel(tracker))
            routed += 1
    return routed
