"""The registry of named suites: public benchmarks on the Hub (or at a pinned GitHub commit), and the SafeKey
reference's own files, each with the column layout it is read in, its default subset, and where that comes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .prompts import BENIGN, CAPABILITY, HARMFUL


@dataclass(frozen=True)
class HubSuite:
    """Where a named suite lives and how its rows become prompts.

    `revision` pins the dataset's commit; None means unpinned (the Hub's `main`), and a warning says so.
    `sample` draws that many prompts by default, shuffled with `seed` the way `datasets.Dataset.shuffle(seed)`
    does; `samples` is how many rollouts per prompt the benchmark's convention asks for.

    Attributes:
        column: The prompt's column, or alternatives (the first the rows hold is read).
        where: Keep rows whose column equals the value (or one of a tuple of values).
        category_column: The category's column (or alternatives; none held: no category).
        context_column: A contextual behavior's context (HarmBench), kept apart for its classifier.
        stride: Keep every `stride`-th row, in the dataset's order (AIR-Bench's subset).
        load_kwargs: Extra arguments of `datasets.load_dataset` (a TSV's delimiter), as pairs.
        data_files: A CSV at a URL (a GitHub commit) read instead of a Hub dataset.
        loader: `category-files`: the dataset's `category_N.csv` files, headerless (HEx-PHI).
        access: How to get access where the dataset is gated.
        source: Where the layout and the subset come from.
    """

    dataset: str
    split: str
    column: str | tuple[str, ...]
    expect: str = HARMFUL
    config: str | None = None
    revision: str | None = None
    where: tuple[str, Any] | None = None
    category_column: str | tuple[str, ...] | None = None
    id_column: str | None = None
    answer_column: str | None = None
    answer_format: str | None = None
    sample: int | None = None
    seed: int = 42
    samples: int = 1
    messages: Callable[[dict[str, Any]], list[dict[str, str]]] | None = None  # default: the column as one turn
    context_column: str | None = None
    stride: int = 1
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    data_files: str | None = None
    loader: str | None = None
    access: str | None = None
    source: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,) if isinstance(self.column, str) else self.column


@dataclass(frozen=True)
class FileSuite:
    """A named suite that is a prompt file at a URL (a pinned GitHub commit), read as a local prompt file is (see
    `files`); `NAME=FILE` reads a local copy instead."""

    url: str
    expect: str = HARMFUL
    revision: str | None = None
    sample: int | None = None
    seed: int = 42
    samples: int = 1
    access: str | None = None
    source: str = ""

    @property
    def dataset(self) -> str:
        return self.url


def harmbench_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A HarmBench behavior as the model is asked it (HarmBench's DirectRequest baseline): the behavior, after its
    context string and a `---` rule when it has one."""
    behavior, context = row["Behavior"], row.get("ContextString") or ""
    return [{"role": "user", "content": f"{context}\n\n---\n\n{behavior}" if context else behavior}]


def sorry_bench_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A SORRY-Bench row's `turns`, a list holding its one user turn."""
    turns = row["turns"]
    if not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], str):
        raise ValueError(f"expected a list of one user turn, got {str(turns)[:60]!r}")
    return [{"role": "user", "content": turns[0]}]


# Dataset revisions. The Hub cannot be reached where this was written: each hash below is one that public evaluation
# code pins the dataset to (found by search, not checked against the Hub here). XSTest's is HELM's (stanford-crfm/helm,
# src/helm/benchmark/scenarios/xstest_scenario.py). HarmBench's CSV is read at the commit promptfoo's HarmBench plugin
# loads it from; the SafeKey reference's files at commits of its repository that hold them. Every other `revision`
# is None: no published pin was found, and none is made up. An unpinned load logs a warning, and every result row
# records the revision actually loaded where it can be resolved (`dataset_revision`).
HARMBENCH_COMMIT = "c0423b952435fcc8467108d8f25962dbae5b7de2"
HARMBENCH_CSV = (
    f"https://raw.githubusercontent.com/centerforaisafety/HarmBench/{HARMBENCH_COMMIT}/data/behavior_datasets/"
    "harmbench_behaviors_text_all.csv"
)
SAFEKEY_RAW = "https://raw.githubusercontent.com/eric-ai-lab/SafeKey"
SAFEKEY_COMMIT = "b8327f4aab786065e427c61cbaacb54056a5b1e5"
SAFEKEY_MULTITURN_COMMIT = "b37763cfad154b6b084b98c26a6283d6bb469c23"
JBB_REVISION = "886acc352a31533ffbcf4ef22c744658688086fc"
AIME24_REVISION = "2fe88a2f1091d5048c0f36abc874fb997b3dd99a"
MATH500_REVISION = "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"
XSTEST_REVISION = "f1d713187c61b6ae64e602d74f0b3d812cc2e8e8"
SUITES: dict[str, HubSuite | FileSuite] = {
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
        # The dataset card's own call loads its TSV files with these (pandas would read "NA" or an empty field as
        # missing): as public code copying the card calls it; the card itself could not be read where this was written
        load_kwargs=(("delimiter", "\t"), ("keep_default_na", False)),
        access="accept AI2's terms (a form) on https://huggingface.co/datasets/allenai/wildjailbreak",
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
        access="accept GPQA's terms on https://huggingface.co/datasets/Idavidrein/gpqa",
    ),
    # The suites peers report. Attack success: HarmBench, AdvBench, SORRY-Bench, HEx-PHI, FORTRESS, AIR-Bench
    "harmbench": HubSuite(
        "centerforaisafety/HarmBench",
        "train",
        "Behavior",
        data_files=HARMBENCH_CSV,
        revision=HARMBENCH_COMMIT,
        # The copyright behaviors are scored by HarmBench's hashing classifier, not an LLM judge: left out
        where=("FunctionalCategory", ("standard", "contextual")),
        id_column="BehaviorID",
        category_column="SemanticCategory",
        context_column="ContextString",
        messages=harmbench_messages,
        source="HarmBench's harmbench_behaviors_text_all.csv (GitHub), its standard and contextual behaviors",
    ),
    "advbench": HubSuite(
        "walledai/AdvBench",
        "train",
        ("prompt", "goal"),  # the Hub copy's column, or the original harmful_behaviors.csv's
        source="AdvBench's 520 harmful behaviors (walledai/AdvBench; llm-attacks' harmful_behaviors.csv as a copy)",
    ),
    "sorry-bench": HubSuite(
        "sorry-bench/sorry-bench-202503",
        "train",
        "turns",
        where=("prompt_style", "base"),
        id_column="question_id",
        category_column="category",
        messages=sorry_bench_messages,
        access="accept the SORRY-Bench licence on https://huggingface.co/datasets/sorry-bench/sorry-bench-202503",
        source="SORRY-Bench's 440 base prompts (44 categories x 10; the 20 linguistic mutations left out)",
    ),
    "hex-phi": HubSuite(
        "LLM-Tuning-Safety/HEx-PHI",
        "train",
        "prompt",
        loader="category-files",
        id_column="id",
        category_column="category",
        access="request access on https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI (the HEx-PHI licence; "
        "its authors grant access by hand)",
        source="HEx-PHI's category_N.csv files (headerless, one instruction a row), the category its file",
    ),
    "fortress": HubSuite(
        "ScaleAI/fortress_public",
        "train",
        "adversarial_prompt",
        id_column="ID",
        category_column="risk_domain",
        source="FORTRESS's 500 adversarial prompts (ScaleAI/fortress_public), by risk domain",
    ),
    "airbench": HubSuite(
        "stanford-crfm/air-bench-2024",
        "test",
        "prompt",
        config="default",
        stride=5,
        category_column="l2-name",
        source="AIR-Bench 2024, every 5th prompt of its test split as the SafeKey reference's parse_airbench takes "
        "them (list(data)[::5])",
    ),
    # Over-refusal: FalseReject's human-annotated test split, CoCoNot's contrast set (requests to comply with).
    # FalseReject's test split has a `prompt` column; the name of its category column could not be read where this
    # was written (its train split's is `category_text`): either is read when present, else no category.
    "falsereject": HubSuite(
        "AmazonScience/FalseReject",
        "test",
        "prompt",
        expect=BENIGN,
        category_column=("category", "category_text"),
        source="FalseReject's test split",
    ),
    "coconot": HubSuite(
        "allenai/coconot",
        "test",
        "prompt",
        expect=BENIGN,
        config="contrast",
        id_column="id",
        category_column="category",
        source="CoCoNot's contrast set (config contrast, split test): requests a model should comply with",
    ),
    # The SafeKey reference's own sets, from its repository at a commit that holds them
    "advbench-prefill": FileSuite(
        f"{SAFEKEY_RAW}/{SAFEKEY_COMMIT}/benchmark/safe_benchmark/datasets/advbench_prefilling/"
        "harmful_r1_8b_gptjudge.csv",
        revision=SAFEKEY_COMMIT,
        source="the SafeKey reference's AdvBench prefilling set (goal,target; the target's first 20 tokens forced, "
        "its --prefilling 20)",
    ),
    "safekey-multiturn": FileSuite(
        f"{SAFEKEY_RAW}/{SAFEKEY_MULTITURN_COMMIT}/benchmark/safe_benchmark/datasets/multiturn/combine.json",
        revision=SAFEKEY_MULTITURN_COMMIT,
        source="the SafeKey reference's multi-turn set ({objective, conversation} rows, judged against the objective)",
    ),
}
SAFETY_SUITES = [name for name, spec in SUITES.items() if spec.expect == HARMFUL]
OVER_REFUSAL_SUITES = [name for name, spec in SUITES.items() if spec.expect == BENIGN]
CAPABILITY_SUITES = [name for name, spec in SUITES.items() if spec.expect == CAPABILITY]

# Code suites run the code a model writes: this package has no sandbox of its own. LiveCodeBench runs through the
# lighteval backend (its `extended|lcb:codegeneration` task executes the code) on a machine the user declares a
# sandbox; HumanEval is not offered.
CODE_SUITES = {
    "livecodebench": (
        "livecodebench runs the code the model writes, and this package has no sandbox of its own: run it with "
        "--backend lighteval --code_sandbox on a machine that is one (a container without network access or "
        "credentials), where lighteval's extended|lcb:codegeneration task executes it."
    ),
    "humaneval": (
        "humaneval runs the code the model writes, and this package has no sandbox to run it in: it is not offered. "
        "For code, run livecodebench with --backend lighteval --code_sandbox on a sandboxed machine."
    ),
}
