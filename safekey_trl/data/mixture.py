"""Data mixtures in TRL's form: several datasets, each with its split, columns, column map and share of the mix.

A recipe's `datasets:` list is read as TRL's `DatasetMixtureConfig` (see [`SafeKeyScriptArguments`]). Each dataset
is read row by row, so that a bad row is named by file and row; rows with U and K are SafeKey examples, rows with
neither offset are plain SFT data that train the LM term only. `fraction`s follow TRL's `get_dataset` rule, applied
to the valid rows: shares normalised to one, and the mixture as large as it can be without oversampling any dataset
(the first `round(share · N)` rows of each are kept).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SafeKeyDatasetConfig
from .reading import LOCAL_SUFFIXES, read_rows
from .rows import InvalidRowReport, SafeKeyDataError, SafeKeyExample, validate_row

logger = logging.getLogger(__name__)


@dataclass
class MixturePart:
    """What one dataset of a mixture contributed."""

    name: str
    rows: int = 0  # rows read
    kept: int = 0  # valid rows kept after `fraction`
    harmful: int = 0
    benign: int = 0
    lm_only: int = 0
    invalid: int = 0

    def describe(self) -> str:
        return (
            f"{self.name}: {self.kept} of {self.rows} rows ({self.harmful} harmful, {self.benign} benign, "
            f"{self.lm_only} LM-only" + (f", {self.invalid} invalid skipped)" if self.invalid else ")")
        )


@dataclass
class MixtureReport:
    """Per-dataset counts of a mixture and the invalid rows left out."""

    parts: list[MixturePart] = field(default_factory=list)
    invalid: InvalidRowReport = field(default_factory=InvalidRowReport)

    @property
    def kept(self) -> int:
        return sum(part.kept for part in self.parts)

    def describe(self) -> str:
        lines = [f"mixture of {len(self.parts)} dataset(s), {self.kept} rows:"]
        for part in self.parts:
            share = part.kept / self.kept if self.kept else 0.0
            lines.append(f"  {share:6.1%}  {part.describe()}")
        return "\n".join(lines)


def dataset_label(config: SafeKeyDatasetConfig) -> str:
    """How a dataset is named in logs and errors: its path, with its files, config name and split when they matter."""
    label = config.path
    if config.data_files is not None:
        label += f" ({config.data_files})"
    if config.name:
        label += f":{config.name}"
    if not _local_files(config):
        label += f"[{config.split}]"
    return label


def _local_files(config: SafeKeyDatasetConfig) -> list[str]:
    """The local files a dataset reads, when it is local: `path` a file, or `path: json|parquet` with `data_files`."""
    if Path(config.path).suffix.lower() in LOCAL_SUFFIXES:
        return [config.path]
    if config.path in ("json", "parquet") and config.data_files is not None and config.data_dir is None:
        files = config.data_files
        if isinstance(files, dict):
            if config.split not in files:
                raise ValueError(f"{config.path}: no split {config.split!r} in data_files {sorted(files)}")
            files = files[config.split]
        files = [files] if isinstance(files, str) else list(files)
        if all(Path(file).suffix.lower() in LOCAL_SUFFIXES for file in files):
            return files
    return []


def read_dataset_rows(config: SafeKeyDatasetConfig) -> Iterator[tuple[str, int, Any]]:
    """Yield `(source, row_number, row)` for one dataset of a mixture, columns selected then renamed.

    Local files are read by [`read_rows`] (1-based rows, the line of a `.jsonl`); anything else goes through
    `datasets.load_dataset` with the config's `name`, `data_dir`, `data_files` and `split`, as TRL's `get_dataset`.
    """
    files = _local_files(config)
    if files:
        sources = ((file, read_rows(file)) for file in files)
    else:
        from datasets import load_dataset

        from ..offline import hub_name

        with hub_name(config.path, "dataset"):
            dataset = load_dataset(
                path=config.path,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                split=config.split,
            )
        sources = iter([(dataset_label(config), enumerate(dataset, start=1))])
    for source, rows in sources:
        for number, row in rows:
            if isinstance(row, dict):
                if config.columns is not None:
                    row = {name: row.get(name) for name in config.columns}
                if config.column_map:
                    row = {config.column_map.get(name, name): value for name, value in row.items()}
            yield source, number, row


def _blame_column_map(error: SafeKeyDataError, config: SafeKeyDatasetConfig, row: Any) -> SafeKeyDataError:
    """A field missing because the column `column_map` renames into it is missing: name that column, not the field."""
    sources = {new: old for old, new in (config.column_map or {}).items()}
    if error.field_name in sources and isinstance(row, dict) and row.get(error.field_name) is None:
        old = sources[error.field_name]
        return SafeKeyDataError(
            error.source, error.row, old, f"missing (the mixture's column_map renames {old!r} to {error.field_name!r})"
        )
    return error


def mixture_sizes(available: list[int], fractions: list[float | None]) -> list[int]:
    """How many rows of each dataset a mixture keeps: all of them without fractions, else TRL's `get_dataset` rule
    (shares normalised to one; the largest total for which no dataset is oversampled; `round(share · total)` each)."""
    if all(fraction is None for fraction in fractions):
        return list(available)
    if any(fraction is None for fraction in fractions):
        raise ValueError("`fraction` must be set for either all datasets in the mixture or none of them.")
    if any(fraction < 0 for fraction in fractions) or sum(fractions) <= 0:
        raise ValueError(f"`fraction`s must be >= 0 with a positive sum, got {fractions}.")
    shares = [fraction / sum(fractions) for fraction in fractions]
    total = min(count / share for count, share in zip(available, shares, strict=True) if share > 0)
    return [min(count, round(share * total)) for count, share in zip(available, shares, strict=True)]


def load_mixture(
    datasets: list[SafeKeyDatasetConfig], skip_invalid: bool = False
) -> tuple[list[SafeKeyExample], MixtureReport]:
    """Read, validate and mix the datasets of a mixture, in order. Rows without U/K are kept as LM-only examples."""
    if not datasets:
        raise ValueError("The mixture has no datasets.")
    report = MixtureReport()
    per_dataset: list[list[SafeKeyExample]] = []
    for config in datasets:
        part = MixturePart(dataset_label(config))
        examples = []
        for source, number, row in read_dataset_rows(config):
            part.rows += 1
            try:
                if isinstance(row, SafeKeyDataError):
                    raise row
                examples.append(validate_row(row, source, number, allow_lm_only=True))
                report.invalid.note(examples[-1])
            except SafeKeyDataError as error:
                error = _blame_column_map(error, config, row)
                if not skip_invalid:
                    raise error from None
                report.invalid.errors.append(error)
                part.invalid += 1
        report.parts.append(part)
        per_dataset.append(examples)
    sizes = mixture_sizes([len(examples) for examples in per_dataset], [config.fraction for config in datasets])
    mixed: list[SafeKeyExample] = []
    for part, examples, size in zip(report.parts, per_dataset, sizes, strict=True):
        kept = examples[:size]
        part.kept = len(kept)
        part.lm_only = sum(example.lm_only for example in kept)
        part.harmful = sum(example.unsafe for example in kept if not example.lm_only)
        part.benign = part.kept - part.lm_only - part.harmful
        mixed += kept
    if report.invalid.count:
        logger.warning(report.invalid.summary())
    if report.invalid.implausible:
        logger.warning(report.invalid.implausible_summary())
    logger.info("%s", report.describe())
    return mixed, report
