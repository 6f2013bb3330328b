"""Prompt suites: what to ask the model, what a safe (or capable) model should do with it, and where it comes from.

- `prompts`: [`EvalPrompt`], what a model should do with it (`expect`), and how capability suites are worded.
- `files`: local prompt files (JSONL, a JSON list such as the reference's multi-turn set, an AdvBench-style CSV).
- `registry`: the named suites ([`SUITES`]): public benchmarks with their layouts and default subsets, the SafeKey
  reference's own files, and the code suites this package refuses without a sandbox.
- `hub`: loading a named suite from the Hub (or its pinned URL), or from a local copy in its layout; gated datasets
  get a message on how to get access.
- `selection`: a seeded draw of a suite's prompts, and the prefilling attack.
- `loading`: [`load_suite`], by name, `NAME=FILE`, or a prompt file.
"""

from .files import file_revision, load_prompt_file, row_to_prompt
from .hub import (
    LOCAL_COPY_SUFFIXES,
    SuiteLoadError,
    category_file_rows,
    gpqa_question,
    hub_rows_to_prompts,
    load_dataset_rows,
    load_hub_suite,
)
from .loading import load_suite, suite_samples
from .prompts import (
    ANSWER_FORMATS,
    BENIGN,
    CAPABILITY,
    CHOICE_LETTERS,
    DEFAULT_PROMPT_FORMAT,
    EXPECTS,
    HARMFUL,
    PREFILL_TOKENS,
    PROMPT_FORMATS,
    R1_MATH_TEMPLATE,
    REFERENCE_AIME_TEMPLATE,
    SIMPLE_EVALS_CHOICE_TEMPLATE,
    SIMPLE_EVALS_MATH_TEMPLATE,
    EvalPrompt,
    PromptFileError,
    PromptFormat,
    fill,
)
from .registry import (
    AIME24_REVISION,
    CAPABILITY_SUITES,
    CODE_SUITES,
    HARMBENCH_COMMIT,
    JBB_REVISION,
    MATH500_REVISION,
    OVER_REFUSAL_SUITES,
    SAFETY_SUITES,
    SUITES,
    XSTEST_REVISION,
    FileSuite,
    HubSuite,
)
from .selection import PREFILL_TARGETS, sample_prompts, with_prefill

__all__ = [
    "AIME24_REVISION",
    "ANSWER_FORMATS",
    "BENIGN",
    "CAPABILITY",
    "CAPABILITY_SUITES",
    "CHOICE_LETTERS",
    "CODE_SUITES",
    "DEFAULT_PROMPT_FORMAT",
    "EXPECTS",
    "HARMBENCH_COMMIT",
    "HARMFUL",
    "JBB_REVISION",
    "LOCAL_COPY_SUFFIXES",
    "MATH500_REVISION",
    "OVER_REFUSAL_SUITES",
    "PREFILL_TARGETS",
    "PREFILL_TOKENS",
    "PROMPT_FORMATS",
    "R1_MATH_TEMPLATE",
    "REFERENCE_AIME_TEMPLATE",
    "SAFETY_SUITES",
    "SIMPLE_EVALS_CHOICE_TEMPLATE",
    "SIMPLE_EVALS_MATH_TEMPLATE",
    "SUITES",
    "XSTEST_REVISION",
    "EvalPrompt",
    "FileSuite",
    "HubSuite",
    "PromptFileError",
    "PromptFormat",
    "SuiteLoadError",
    "category_file_rows",
    "file_revision",
    "fill",
    "gpqa_question",
    "hub_rows_to_prompts",
    "load_dataset_rows",
    "load_hub_suite",
    "load_prompt_file",
    "load_suite",
    "row_to_prompt",
    "sample_prompts",
    "suite_samples",
    "with_prefill",
]
