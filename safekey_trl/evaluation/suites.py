"""Prompt suites: what to ask the model, what a safe (or capable) model should do with it, and where it comes from.

A suite is a registry name (the public benchmarks of [`SUITES`], loaded from the Hub, or from a local copy with
`name=path`), or a local file:

- **JSONL prompt file**, one prompt a line::

      {"prompt": str | [{"role": ..., "content": ...}, ...], "id": str | int, "prefill": str, "prefill_tokens": int,
       "category": str, "expect": "harmful" | "benign" | "capability", "objective": str, "answer": str,
       "answer_format": "math" | "choice"}

  Only `prompt` is required (`conversation` and `question` are accepted for it). `id` defaults to the line number,
  `expect` to `"harmful"`. A `"benign"` prompt is judged for refusal (over-refusal), a harmful one for harmfulness,
  a `"capability"` one is scored against its `answer`. `prefill` is forced at the start of the reasoning trace (the
  prefilling attack), cut to its first `prefill_tokens` tokens when given; a list `prompt` is a multi-turn
  conversation ending with a user turn, judged against its `objective` when it has one.
- **JSON file**: a list of such objects; the multi-turn set of the SafeKey reference (`{"objective",
  "conversation"}` rows) is one.
- **CSV file**: an AdvBench-style prefilling set (`goal,target`: the goal is asked, the first
  [`PREFILL_TOKENS`] tokens of the target are prefilled), or WildChat-style prompts (a `question` or `prompt`
  column; any `category` column is kept).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HARMFUL = "harmful"
BENIGN = "benign"
CAPABILITY = "capability"
EXPECTS = (HARMFUL, BENIGN, CAPABILITY)
ANSWER_FORMATS = ("math", "choice")
# The SafeKey reference prefills the first 20 tokens of each AdvBench target (its `--prefilling 20`)
PREFILL_TOKENS = 20
CHOICE_LETTERS = "ABCD"

# Capability prompts. Placeholders are filled by plain replacement (`{problem}`; `{question}` and `{A}`..`{D}`), so
# the LaTeX braces of a template need no escaping.
# DeepSeek-R1's usage recommendation for math (its model card): the problem, then this directive
R1_MATH_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
# simple-evals' multiple-choice template (openai/simple-evals, common.py), which DeepSeek-R1's paper and the SafeKey
# reference (benchmark/reasoning_benchmark/gpqa_eval.py) both use for GPQA
SIMPLE_EVALS_CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
    "\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)
# simple-evals' MATH template, as the SafeKey reference runs MATH-500 (benchmark/reasoning_benchmark/math_eval.py)
SIMPLE_EVALS_MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:", and you do not need to use a \\boxed command.'
)
# The SafeKey reference's AIME template (benchmark/reasoning_benchmark/aime_eval.py)
REFERENCE_AIME_TEMPLATE = (
    "Solve the following AIME math problem step by step. The last line of your response should be of the form "
    "\\boxed{X} where X is the answer to the problem.\n\n{problem}\n\nIMPORTANT: Your final answer MUST be in the "
    "format \\boxed{X} where X is your numerical answer. This is critical for automated evaluation."
)


@dataclass(frozen=True)
class PromptFormat:
    """How a capability suite's rows are asked: a template per answer format (`math`, `choice`), a suite name
    overriding its format's, and where the wording comes from."""

    name: str
    templates: dict[str, str]
    source: str

    def template(self, suite: str, answer_format: str) -> str:
        return self.templates.get(suite) or self.templates[answer_format]


PROMPT_FORMATS: dict[str, PromptFormat] = {
    fmt.name: fmt
    for fmt in (
        PromptFormat(
            "r1",
            {"math": R1_MATH_TEMPLATE, "choice": SIMPLE_EVALS_CHOICE_TEMPLATE},
            "DeepSeek-R1's model card (math: the \\boxed{} directive) and paper (GPQA: simple-evals' template)",
        ),
        PromptFormat(
            "safekey-reference",
            {
                "math": SIMPLE_EVALS_MATH_TEMPLATE,
                "choice": SIMPLE_EVALS_CHOICE_TEMPLATE,
                "aime24": REFERENCE_AIME_TEMPLATE,
            },
            "the SafeKey reference's benchmark/reasoning_benchmark (simple-evals' MATH and GPQA templates, its AIME "
            "template)",
        ),
    )
}
DEFAULT_PROMPT_FORMAT = "r1"


def fill(template: str, **values: str) -> str:
    """`template` with each `{name}` of `values` replaced, in one pass (a value holding `{A}` stays as it is)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


@dataclass
class EvalPrompt:
    """One prompt to evaluate: the chat turns, what a model should do with it, and how it is judged or scored."""

    suite: str
    id: str
    messages: list[dict[str, str]]
    expect: str = HARMFUL
    prefill: str | None = None
    category: str | None = None
    prefill_tokens: int | None = None  # force only this many tokens of `prefill`
    objective: str | None = None  # a multi-turn attack's goal: what the judge holds the reply against
    answer: str | None = None  # a capability prompt's reference answer
    answer_format: str | None = None  # "math" (equivalence) or "choice" (a letter)
    prompt_format: str | None = None  # a capability prompt's wording (a key of PROMPT_FORMATS)
    dataset: str | None = None  # where the prompt comes from: a Hub dataset or a local file
    dataset_revision: str | None = None  # its commit, or `sha256:<hex>` of a local file; None when unknown

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the prompt in a results file."""
        return self.suite, self.id


class PromptFileError(ValueError):
    """A row of a prompt file that does not follow the format. Names the file, the row and the field."""

    def __init__(self, source: str, line: int, field_name: str, message: str):
        self.source, self.line, self.field_name = source, line, field_name
        super().__init__(f"{source}: line {line}, field '{field_name}': {message}")


# ---------------------------------------------------------------------------------------------------------------------
# Public benchmarks


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


@dataclass(frozen=True)
class HubSuite:
    """Where a named suite lives on the Hub and how its rows become prompts.

    `revision` pins the dataset's commit; None means unpinned (the Hub's `main`), and a warning says so.
    `sample` draws that many prompts by default, shuffled with `seed` the way `datasets.Dataset.shuffle(seed)`
    does; `samples` is how many rollouts per prompt the benchmark's convention asks for.
    """

    dataset: str
    split: str
    column: str
    expect: str = HARMFUL
    config: str | None = None
    revision: str | None = None
    where: tuple[str, Any] | None = None  # keep rows whose column equals the value
    category_column: str | None = None
    id_column: str | None = None
    answer_column: str | None = None
    answer_format: str | None = None
    sample: int | None = None
    seed: int = 42
    samples: int = 1
    messages: Callable[[dict[str, Any]], list[dict[str, str]]] | None = None  # default: the column as one turn


# Dataset revisions. The Hub cannot be reached where this was written: each hash below is one that public evaluation
# code pins the dataset to (found by search, not checked against the Hub here). XSTest's is HELM's (stanford-crfm/helm,
# src/helm/benchmark/scenarios/xstest_scenario.py). Every other `revision` is None: no published pin was found, and
# none is made up. An unpinned load logs a warning, and every result row records the revision actually loaded where
# it can be resolved (`dataset_revision`).
JBB_REVISION = "886acc352a31533ffbcf4ef22c744658688086fc"
AIME24_REVISION = "2fe88a2f1091d5048c0f36abc874fb997b3dd99a"
MATH500_REVISION = "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"
XSTEST_REVISION = "f1d713187c61b6ae64e602d74f0b3d812cc2e8e8"
SUITES: dict[str, HubSuite] = {
    # Safety: harmful prompts, judged for harmfulness
    "strongreject": HubSuite("walledai/StrongREJECT", "train", "prompt", category_column="category"),
    "jailbreakbench": HubSuite(
        "JailbreakBench/JBB-Behaviors",
        "harmful",
        "Goal",
        config="behaviors",
        revision=JBB_REVISION,
        category_column="Category",
    ),
    # The paper reports a 250-prompt subset of the 2,000 adversarial-harmful prompts, shuffled with seed 42
    "wildjailbreak": HubSuite(
        "allenai/wildjailbreak",
        "train",
        "adversarial",
        config="eval",
        where=("data_type", "adversarial_harmful"),
        sample=250,
        seed=42,
    ),
    # Over-refusal: safe prompts that sound unsafe, judged for refusal. XSTest has one split, `test`.
    "xstest": HubSuite(
        "walledai/XSTest",
        "test",
        "prompt",
        expect=BENIGN,
        revision=XSTEST_REVISION,
        where=("label", "safe"),
        category_column="type",
    ),
    "jailbreakbench-benign": HubSuite(
        "JailbreakBench/JBB-Behaviors",
        "benign",
        "Goal",
        expect=BENIGN,
        config="behaviors",
        revision=JBB_REVISION,
        category_column="Category",
    ),
    "phtest": HubSuite("furonghuang-lab/PHTest", "train", "Request", expect=BENIGN, where=("Harmfulness", "harmless")),
    "orbench-hard": HubSuite(
        "bench-llm/or-bench", "train", "prompt", expect=BENIGN, config="or-bench-hard-1k", category_column="category"
    ),
    # Capability retention: scored against the reference answer. AIME is small and noisy: several rollouts each.
    "aime24": HubSuite(
        "HuggingFaceH4/aime_2024",
        "train",
        "problem",
        expect=CAPABILITY,
        revision=AIME24_REVISION,
        id_column="id",
        answer_column="answer",
        answer_format="math",
        samples=8,
    ),
    "math500": HubSuite(
        "HuggingFaceH4/MATH-500",
        "test",
        "problem",
        expect=CAPABILITY,
        revision=MATH500_REVISION,
        id_column="unique_id",
        category_column="subject",
        answer_column="answer",
        answer_format="math",
    ),
    "gpqa-diamond": HubSuite(
        "Idavidrein/gpqa",
        "train",
        "Question",
        expect=CAPABILITY,
        config="gpqa_diamond",
        id_column="Record ID",
        category_column="High-level domain",
        answer_format="choice",
    ),
}
SAFETY_SUITES = [name for name, spec in SUITES.items() if spec.expect == HARMFUL]
OVER_REFUSAL_SUITES = [name for name, spec in SUITES.items() if spec.expect == BENIGN]
CAPABILITY_SUITES = [name for name, spec in SUITES.items() if spec.expect == CAPABILITY]


def sample_prompts(prompts: list[EvalPrompt], count: int | None, seed: int) -> list[EvalPrompt]:
    """`count` prompts drawn without replacement, in the order `datasets.Dataset.shuffle(seed)` puts them; all of
    them (in file order) when `count` is None or 0. The same seed draws the same prompts in every run."""
    if not count or count >= len(prompts):
        return list(prompts)
    import numpy as np

    return [prompts[int(i)] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]]


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
    prompts = []
    for index, row in enumerate(rows):
        needed = [spec.column, spec.where[0] if spec.where else None, spec.answer_column, spec.id_column]
        missing = [column for column in needed if column is not None and column not in row]
        if missing:
            raise PromptFileError(source, index + 1, missing[0], f"missing (suite {name} reads {spec.dataset})")
        if spec.where is not None and row[spec.where[0]] != spec.where[1]:
            continue
        answer = str(row[spec.answer_column]) if spec.answer_column else None
        if spec.answer_format == "choice":
            question, answer = gpqa_question(row, spec.seed, wording.template(name, "choice"))
            messages = [{"role": "user", "content": question}]
        elif spec.messages is not None:
            messages = spec.messages(row)
        elif spec.answer_format == "math":
            messages = [{"role": "user", "content": fill(wording.template(name, "math"), problem=row[spec.column])}]
        else:
            messages = [{"role": "user", "content": row[spec.column]}]
        prompt_id = str(row[spec.id_column]) if spec.id_column else str(index)
        category = row.get(spec.category_column) if spec.category_column else None
        prompts.append(
            EvalPrompt(
                name,
                prompt_id,
                messages,
                spec.expect,
                category=category,
                answer=answer,
                answer_format=spec.answer_format,
                prompt_format=prompt_format if spec.expect == CAPABILITY else None,
                dataset=source,
                dataset_revision=revision,
            )
        )
    return prompts


class SuiteLoadError(ValueError):
    """A Hub suite that could not be loaded (no network, a gated dataset, a wrong split or revision)."""


LOCAL_COPY_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def file_revision(path: str | Path) -> str:
    """A local file's identity for result rows: `sha256:<hex>` of its bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _resolved_revision(dataset: Any, spec: HubSuite) -> str | None:
    """The commit a Hub load came from: the pin, else the commit `datasets` cached it under (a 40-hex directory of
    its cache path), else the Hub's answer when it can be asked; None when none of these says."""
    if spec.revision is not None:
        return spec.revision
    for entry in getattr(dataset, "cache_files", None) or []:
        for part in Path(entry.get("filename", "")).parts:
            if re.fullmatch(r"[0-9a-f]{40}", part):
                return part
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(spec.dataset).sha
    except Exception:  # no network, a gated dataset: the row says the revision is unknown
        return None


def load_dataset_rows(spec: HubSuite, local: str | None = None) -> tuple[Any, str | None]:
    """The suite's rows and the revision they come from: from the Hub at the pinned revision, or from a local copy
    (`.jsonl`, `.json`, `.csv`, `.parquet`) in the same column layout, identified by its hash."""
    import datasets

    if local is not None:
        path = Path(local)
        if not path.is_file():
            raise FileNotFoundError(f"{local}: no such file")
        builder = LOCAL_COPY_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{local}: a local suite copy must be .jsonl, .json, .csv or .parquet")
        return datasets.load_dataset(builder, data_files=str(path), split="train"), file_revision(path)
    if spec.revision is None:
        logger.warning("%s is not pinned to a dataset revision: numbers may not compare across runs", spec.dataset)
    try:
        rows = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, revision=spec.revision)
    except Exception as error:  # the Hub's failures come in many types: one clear line with the way out
        where = f"{spec.dataset} (config {spec.config}, split {spec.split}, revision {spec.revision or 'main'})"
        raise SuiteLoadError(
            f"could not load {where}: {type(error).__name__}: {error}. Without the Hub, give a local copy in the "
            "same columns as --suite NAME=FILE."
        ) from None
    revision = _resolved_revision(rows, spec)
    if revision is None:
        logger.warning("%s: the revision loaded could not be resolved; result rows record it as unknown", spec.dataset)
    return rows, revision


def load_hub_suite(
    name: str, local: str | None = None, prompt_format: str = DEFAULT_PROMPT_FORMAT
) -> list[EvalPrompt]:
    """Load a suite of [`SUITES`] from the Hub (needs network, and the dataset's terms accepted where gated) or
    from a local copy of it, with the suite's default subset (see [`HubSuite`])."""
    spec = SUITES[name]
    rows, revision = load_dataset_rows(spec, local)
    return hub_rows_to_prompts(name, spec, rows, local or spec.dataset, prompt_format, revision)


# ---------------------------------------------------------------------------------------------------------------------
# Local files


def _prompt_messages(value: Any, source: str, line: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise PromptFileError(source, line, "prompt", "empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value):
            raise PromptFileError(source, line, "prompt", "expected a list of {'role', 'content'} turns")
        if value[-1]["role"] != "user":
            raise PromptFileError(source, line, "prompt", "the last turn must be the user's")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PromptFileError(source, line, "prompt", "expected a string or a non-empty list of chat turns")


def row_to_prompt(row: Any, source: str, line: int, suite: str) -> EvalPrompt:
    """One row of a local prompt file (format in the module docstring) as a prompt."""
    if not isinstance(row, dict):
        raise PromptFileError(source, line, "<row>", "expected a JSON object")
    text_field = next((name for name in ("prompt", "conversation", "question", "goal") if name in row), None)
    if text_field is None:
        raise PromptFileError(source, line, "prompt", "missing")
    messages = _prompt_messages(row[text_field], source, line)
    expect = row.get("expect") or HARMFUL
    if expect not in EXPECTS:
        raise PromptFileError(source, line, "expect", f"expected one of {', '.join(EXPECTS)}, got {expect!r}")
    for name in ("prefill", "category", "objective", "answer", "target"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise PromptFileError(source, line, name, "expected a string")
    prefill, prefill_tokens = row.get("prefill"), row.get("prefill_tokens")
    if prefill is None and row.get("target"):  # AdvBench's goal,target: the target's first tokens are forced
        prefill, prefill_tokens = row["target"], prefill_tokens or PREFILL_TOKENS
    if prefill_tokens is not None:
        if isinstance(prefill_tokens, str) and prefill_tokens.strip().isdigit():
            prefill_tokens = int(prefill_tokens)
        if not isinstance(prefill_tokens, int) or isinstance(prefill_tokens, bool) or prefill_tokens < 1:
            raise PromptFileError(source, line, "prefill_tokens", "expected a positive integer")
    answer_format = row.get("answer_format") or ("math" if expect == CAPABILITY else None)
    if expect == CAPABILITY:
        if not row.get("answer"):
            raise PromptFileError(source, line, "answer", "a capability prompt needs its reference answer")
        if answer_format not in ANSWER_FORMATS:
            raise PromptFileError(source, line, "answer_format", f"expected one of {', '.join(ANSWER_FORMATS)}")
    return EvalPrompt(
        suite,
        str(row.get("id", line)),
        messages,
        expect,
        prefill,
        row.get("category"),
        prefill_tokens,
        row.get("objective"),
        row.get("answer"),
        answer_format,
    )


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    source = str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise PromptFileError(source, number, "<json>", f"not valid JSON ({error.msg})") from None
        return rows
    if suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PromptFileError(source, error.lineno, "<json>", f"not valid JSON ({error.msg})") from None
        if not isinstance(value, list):
            raise PromptFileError(source, 1, "<json>", "expected a list of prompt objects")
        return list(enumerate(value, start=1))
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            names = set(reader.fieldnames or [])
            if not names & {"goal", "question", "prompt"}:
                raise PromptFileError(source, 1, "<header>", "expected a goal,target or a question/prompt column")
            # Line numbers count the header: row 1 of the data is line 2 of the file
            return [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    raise ValueError(f"{path}: a prompt file must be .jsonl, .json or .csv")


def load_prompt_file(path: str | Path, suite: str | None = None) -> list[EvalPrompt]:
    """Read a local prompt file (formats in the module docstring). The suite name defaults to the file's stem."""
    path = Path(path)
    source, suite = str(path), suite or path.stem
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    revision = file_revision(path) if path.is_file() else None
    for line, row in _read_rows(path):
        prompt = row_to_prompt(row, source, line, suite)
        prompt.dataset, prompt.dataset_revision = source, revision
        # The id keys resumption: two prompts under one id would shadow each other
        if prompt.id in seen:
            raise PromptFileError(source, line, "id", f"duplicate id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return prompts


def load_suite(
    spec: str,
    limit: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
) -> list[EvalPrompt]:
    """A suite by registry name (see [`SUITES`]), `name=path` (a local copy of a registry suite), or a local
    prompt file.

    `sample` draws that many prompts with `seed` (0: all of them); None keeps the suite's default subset (the
    paper's 250 WildJailbreak prompts) and seed. `limit` then keeps the first N. `prompt_format` words the
    capability suites of the registry (see [`PROMPT_FORMATS`]).
    """
    name, _, local = spec.partition("=")
    if name in SUITES:
        prompts = load_hub_suite(name, local or None, prompt_format)
        default = SUITES[name]
        prompts = sample_prompts(
            prompts, default.sample if sample is None else sample, default.seed if seed is None else seed
        )
    elif local:
        raise ValueError(f"Unknown suite {name!r} in {spec!r}: name=path needs one of {sorted(SUITES)}.")
    elif Path(spec).suffix.lower() in (".jsonl", ".json", ".csv") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec}: no such prompt file")
        prompts = sample_prompts(load_prompt_file(spec), sample, 42 if seed is None else seed)
    else:
        raise ValueError(f"Unknown suite {spec!r}: use one of {sorted(SUITES)}, name=path, or a prompt file.")
    return prompts[:limit] if limit is not None else prompts


PREFILL_TARGETS = ("harmful", "all")


def with_prefill(
    prompts: list[EvalPrompt], prefill: str, tokens: int | None = None, on: str = "harmful"
) -> list[EvalPrompt]:
    """Force `prefill` at the start of every trace that has no prefill of its own (the prefilling attack): of the
    harmful prompts only (`on="harmful"`: the attack is on requests a model should refuse), or of `"all"`."""
    if on not in PREFILL_TARGETS:
        raise ValueError(f"--prefill_on {on!r}: use harmful or all.")

    def targeted(prompt: EvalPrompt) -> bool:
        return prompt.prefill is None and (on == "all" or prompt.expect == HARMFUL)

    return [replace(p, prefill=prefill, prefill_tokens=tokens) if targeted(p) else p for p in prompts]


def suite_samples(spec: str) -> int:
    """How many rollouts per prompt the suite's convention asks for (1 for a local file)."""
    name = spec.partition("=")[0]
    return SUITES[name].samples if name in SUITES else 1
