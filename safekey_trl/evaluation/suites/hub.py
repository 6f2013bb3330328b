"""Loading a named suite: from the Hub at its pinned revision (or a CSV at a pinned GitHub commit, or a file of the
SafeKey reference's repository), or from a local copy in the same layout (`NAME=FILE`); its rows turned into prompts.

A gated dataset the Hub refuses is an error saying where to accept its terms and how to log in; any other failure is
one line naming the dataset, config, split and revision, and the way out (a local copy).
"""

from __future__ import annotations

import csv
import logging
import random
import re
from pathlib import Path
from typing import Any

from ...offline import is_offline
from ..access import GatedAccessError, gated_message, is_gated
from .files import file_revision, load_prompt_file
from .prompts import (
    CAPABILITY,
    CHOICE_LETTERS,
    DEFAULT_PROMPT_FORMAT,
    PROMPT_FORMATS,
    SIMPLE_EVALS_CHOICE_TEMPLATE,
    EvalPrompt,
    PromptFileError,
    fill,
)
from .registry import SUITES, FileSuite, HubSuite

logger = logging.getLogger(__name__)


class SuiteLoadError(ValueError):
    """A Hub suite that could not be loaded (no network, a wrong split or revision)."""


LOCAL_COPY_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def gpqa_question(row: dict[str, Any], seed: int, template: str = SIMPLE_EVALS_CHOICE_TEMPLATE) -> tuple[str, str]:
    """A GPQA row as a four-choice question (`template` filled) and its correct letter.

    The choices are shuffled by a generator seeded with the seed and the row's record id, so the correct letter is
    spread over A–D and the same in every run and on every machine.
    """
    choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(f"{seed}:{row.get('Record ID', row['Question'])}").shuffle(order)
    options = {letter: str(choices[i]).strip() for letter, i in zip(CHOICE_LETTERS, order, strict=True)}
    return fill(template, question=str(row["Question"]).strip(), **options), CHOICE_LETTERS[order.index(0)]


def _first_present(row: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    return next((column for column in columns if column in row), None)


def _kept(row: dict[str, Any], where: tuple[str, Any] | None) -> bool:
    if where is None:
        return True
    allowed = where[1] if isinstance(where[1], (tuple, frozenset, set)) else (where[1],)
    return row[where[0]] in allowed


def hub_rows_to_prompts(
    name: str,
    spec: HubSuite,
    rows: Any,
    source: str,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    revision: str | None = None,
) -> list[EvalPrompt]:
    """Turn a suite's rows (its real column layout) into prompts; a missing column is named with the source.
    Capability suites are worded by `prompt_format` (a key of [`PROMPT_FORMATS`])."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"Unknown prompt format {prompt_format!r}: use one of {sorted(PROMPT_FORMATS)}.")
    wording = PROMPT_FORMATS[prompt_format]
    categories = (
        (spec.category_column,) if isinstance(spec.category_column, str) else tuple(spec.category_column or ())
    )
    prompts = []
    for index, row in enumerate(rows):
        if index % spec.stride:
            continue
        column = _first_present(row, spec.columns)
        needed = [column or spec.columns[0], spec.where[0] if spec.where else None, spec.answer_column, spec.id_column]
        missing = [column for column in needed if column is not None and column not in row]
        if missing:
            raise PromptFileError(source, index + 1, missing[0], f"missing (suite {name} reads {spec.dataset})")
        if not _kept(row, spec.where):
            continue
        answer = str(row[spec.answer_column]) if spec.answer_column else None
        try:
            if spec.answer_format == "choice":
                question, answer = gpqa_question(row, spec.seed, wording.template(name, "choice"))
                messages = [{"role": "user", "content": question}]
            elif spec.messages is not None:
                messages = spec.messages(row)
            elif spec.answer_format == "math":
                messages = [{"role": "user", "content": fill(wording.template(name, "math"), problem=row[column])}]
            else:
                messages = [{"role": "user", "content": row[column]}]
        except ValueError as error:
            raise PromptFileError(source, index + 1, str(column), str(error)) from None
        if not isinstance(messages[-1]["content"], str) or not messages[-1]["content"].strip():
            raise PromptFileError(source, index + 1, str(column), "empty, or not text")
        prompt_id = str(row[spec.id_column]) if spec.id_column else str(index)
        category_column = _first_present(row, categories)
        category = row.get(category_column) if category_column else None
        context = row.get(spec.context_column) if spec.context_column else None
        prompts.append(
            EvalPrompt(
                name,
                prompt_id,
                messages,
                spec.expect,
                category=None if category is None else str(category),
                answer=answer,
                answer_format=spec.answer_format,
                prompt_format=prompt_format if spec.expect == CAPABILITY else None,
                dataset=source,
                dataset_revision=revision,
                context=context or None,
            )
        )
    return prompts


def _resolved_revision(dataset: Any, spec: HubSuite) -> str | None:
    """The commit a Hub load came from: the pin, else the commit `datasets` cached it under (a 40-hex directory of
    its cache path), else the Hub's answer when it can be asked; None when none of these says."""
    if spec.revision is not None:
        return spec.revision
    for entry in getattr(dataset, "cache_files", None) or []:
        for part in Path(entry.get("filename", "")).parts:
            if re.fullmatch(r"[0-9a-f]{40}", part):
                return part
    if is_offline():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(spec.dataset).sha
    except Exception:  # no network, a gated dataset: the row says the revision is unknown
        return None


def _refused(name: str, spec: HubSuite | FileSuite, error: BaseException) -> Exception:
    """The error to raise for a failed load: how to get access for a gated dataset, else one line and a way out."""
    local = f"give a local copy in the same layout as --suite {name}=FILE"
    if is_gated(error):
        return GatedAccessError(gated_message(spec.dataset, "dataset", spec.access or "", local))
    if isinstance(spec, FileSuite):
        where = spec.url
    else:
        where = spec.data_files or f"{spec.dataset} (config {spec.config}, split {spec.split}"
        where += "" if spec.data_files else f", revision {spec.revision or 'main'})"
    return SuiteLoadError(
        f"could not load {where}: {type(error).__name__}: {error}. Without the Hub, {local} (NAME=FILE)."
    )


def _local_rows(path: Path, spec: HubSuite) -> Any:
    import datasets

    builder = LOCAL_COPY_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: a local suite copy must be .jsonl, .json, .csv, .tsv or .parquet")
    kwargs = dict(spec.load_kwargs) if builder == "csv" else {}
    if builder == "csv":
        # Text as written: pandas would read "NA" or "None" as missing
        kwargs.setdefault("keep_default_na", False)
        if path.suffix.lower() == ".tsv":
            kwargs.setdefault("delimiter", "\t")
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def category_file(path: Path) -> list[dict[str, str]]:
    """One HEx-PHI category file (`category_N.csv`, headerless, one instruction a row: its first cell) as rows of
    `{"id": "N-line", "category": "category_N", "prompt"}`."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for line, cells in enumerate(csv.reader(handle), start=1):
            if cells and cells[0].strip():
                number = path.stem.removeprefix("category_")
                rows.append({"id": f"{number}-{line}", "category": path.stem, "prompt": cells[0]})
    return rows


def category_file_rows(directory: Path) -> list[dict[str, str]]:
    """HEx-PHI's layout: a directory of `category_N.csv` files, read in category order."""
    files = sorted(directory.glob("category_*.csv"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise FileNotFoundError(f"{directory}: no category_N.csv files (HEx-PHI's layout)")
    return [row for path in files for row in category_file(path)]


def load_dataset_rows(spec: HubSuite, local: str | None = None, name: str = "") -> tuple[Any, str | None]:
    """The suite's rows and the revision they come from: from the Hub at the pinned revision (or the CSV at its
    URL), or from a local copy (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`; for HEx-PHI a directory of its
    category files) in the same column layout, identified by its hash."""
    import datasets

    if local is not None:
        path = Path(local)
        if spec.loader == "category-files" and path.is_dir():
            return category_file_rows(path), None
        if not path.is_file():
            raise FileNotFoundError(f"{local}: no such file")
        if spec.loader == "category-files" and path.suffix.lower() == ".csv":
            return category_file(path), file_revision(path)
        return _local_rows(path, spec), file_revision(path)
    if spec.revision is None:
        logger.warning("%s is not pinned to a dataset revision: numbers may not compare across runs", spec.dataset)
    try:
        if spec.loader == "category-files":
            from huggingface_hub import snapshot_download

            directory = Path(
                snapshot_download(
                    spec.dataset, repo_type="dataset", revision=spec.revision, allow_patterns=["category_*.csv"]
                )
            )
            found = [part for part in directory.parts if re.fullmatch(r"[0-9a-f]{40}", part)]
            return category_file_rows(directory), spec.revision or (found[-1] if found else None)
        if spec.data_files is not None:
            rows = datasets.load_dataset(
                "csv", data_files=spec.data_files, split="train", keep_default_na=False, **dict(spec.load_kwargs)
            )
        else:
            rows = datasets.load_dataset(
                spec.dataset, spec.config, split=spec.split, revision=spec.revision, **dict(spec.load_kwargs)
            )
    except Exception as error:  # the Hub's failures come in many types: one clear line with the way out
        raise _refused(name or spec.dataset, spec, error) from None
    revision = _resolved_revision(rows, spec)
    if revision is None:
        logger.warning("%s: the revision loaded could not be resolved; result rows record it as unknown", spec.dataset)
    return rows, revision


def load_file_suite(name: str, spec: FileSuite, local: str | None = None) -> list[EvalPrompt]:
    """A suite that is a prompt file: downloaded from its URL (cached by `datasets`), or a local copy."""
    if local is not None:
        if not Path(local).is_file():
            raise FileNotFoundError(f"{local}: no such file")
        return load_prompt_file(local, suite=name)
    from datasets.utils.file_utils import cached_path

    try:
        path = cached_path(spec.url)
    except Exception as error:
        raise _refused(name, spec, error) from None
    prompts = load_prompt_file(path, suite=name)
    for prompt in prompts:
        prompt.dataset, prompt.dataset_revision = spec.url, spec.revision
    return prompts


def load_hub_suite(
    name: str, local: str | None = None, prompt_format: str = DEFAULT_PROMPT_FORMAT
) -> list[EvalPrompt]:
    """Load a suite of [`SUITES`] from the Hub (needs network, and the dataset's terms accepted where gated) or
    from a local copy of it, with the suite's default subset (see [`HubSuite`])."""
    spec = SUITES[name]
    if isinstance(spec, FileSuite):
        return load_file_suite(name, spec, local)
    rows, revision = load_dataset_rows(spec, local, name)
    return hub_rows_to_prompts(name, spec, rows, local or spec.data_files or spec.dataset, prompt_format, revision)
