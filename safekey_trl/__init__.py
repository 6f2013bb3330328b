"""SafeKey safety alignment as a TRL trainer: Query-Mask Modeling and a Dual-Path Safety Head on top of SFT.

The public names are imported on first use (PEP 562), so that `import safekey_trl` and the command line's `--help`
do not load torch, transformers and TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DualPathSafetyHead": ".heads",
    "SafeKeyConfig": ".config",
    "SafeKeyScriptArguments": ".config",
    "SafeKeyDataCollator": ".trainer",
    "SafeKeySFTTrainer": ".trainer",
    "SafeKeyDataError": ".data",
    "SafeKeyExample": ".data",
    "featurize": ".data",
    "featurize_example": ".data",
    "load_examples": ".data",
    "load_safekey_dataset": ".data",
}

__all__ = [
    "DualPathSafetyHead",
    "SafeKeyConfig",
    "SafeKeyDataCollator",
    "SafeKeyDataError",
    "SafeKeyExample",
    "SafeKeySFTTrainer",
    "SafeKeyScriptArguments",
    "featurize",
    "featurize_example",
    "load_examples",
    "load_safekey_dataset",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .config import SafeKeyConfig, SafeKeyScriptArguments
    from .data import (
        SafeKeyDataError,
        SafeKeyExample,
        featurize,
        featurize_example,
        load_examples,
        load_safekey_dataset,
    )
    from .heads import DualPathSafetyHead
    from .trainer import SafeKeyDataCollator, SafeKeySFTTrainer
