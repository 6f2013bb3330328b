"""SafeKey safety alignment as a TRL trainer: Query-Mask Modeling and a Dual-Path Safety Head on top of SFT."""

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

__version__ = "0.1.0"

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
