"""The files shipped with safekey-trl: training recipes, accelerate configs and the sample dataset.

They live at the top of the checkout (`recipes/`, `recipes/accelerate/`, `data/`) and are installed as the package
data `safekey_trl.recipes`, `safekey_trl.recipes.accelerate` and `safekey_trl.sample_data` (pyproject's
`package-dir` mapping). An installed package finds them through `importlib.resources`; a checkout on the import path
(tests, `PYTHONPATH=.`), where the mapping does not apply, finds them beside the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATASET = "data/safekey_sample.jsonl"  # the tiny recipe's dataset, relative to the checkout


def _shipped_dir(relative: str, checkout_dir: Path) -> Path:
    # The installed package holds the files (the subpackages have no __init__.py: ask the parent, whose files are
    # real paths); a checkout on the import path does not, and keeps them at the top of the checkout
    installed = Path(str(resources.files("safekey_trl"))) / relative
    return installed if installed.is_dir() else checkout_dir


def recipes_dir() -> Path:
    """The directory of the shipped recipes."""
    return _shipped_dir("recipes", CHECKOUT_ROOT / "recipes")


def accelerate_configs_dir() -> Path:
    """The directory of the shipped accelerate configs."""
    return _shipped_dir("recipes/accelerate", CHECKOUT_ROOT / "recipes" / "accelerate")


def sample_data_dir() -> Path:
    """The directory of the shipped sample dataset."""
    return _shipped_dir("sample_data", CHECKOUT_ROOT / "data")


def resolve_dataset_path(name: str) -> str:
    """`name` itself when it exists (or is a Hub name); the shipped copy of the sample dataset when `name` is the
    tiny recipe's `data/safekey_sample.jsonl` and the current directory has none (after a `pip install`)."""
    if Path(name).exists() or Path(name).as_posix() != SAMPLE_DATASET:
        return name
    shipped = sample_data_dir() / Path(SAMPLE_DATASET).name
    return str(shipped) if shipped.is_file() else name


@dataclass
class ShippedConfig:
    """One shipped recipe or accelerate config: its name, path, model (recipes) and its header's first sentence."""

    name: str
    path: Path
    model: str | None
    description: str


def _describe(path: Path) -> ShippedConfig:
    import yaml

    text = path.read_text(encoding="utf-8")
    header = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    header = re.split(r"(?<=\.) ", header, maxsplit=1)[0].rstrip(".:,")
    values = yaml.safe_load(text) or {}
    model = values.get("model_name_or_path") if isinstance(values, dict) else None
    return ShippedConfig(path.stem, path, model, header)


def shipped_recipes() -> list[ShippedConfig]:
    """Every shipped recipe, by name."""
    return [_describe(path) for path in sorted(recipes_dir().glob("*.yaml"))]


def shipped_accelerate_configs() -> list[ShippedConfig]:
    """Every shipped accelerate config, by name."""
    return [_describe(path) for path in sorted(accelerate_configs_dir().glob("*.yaml"))]
