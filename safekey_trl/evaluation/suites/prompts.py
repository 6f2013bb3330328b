"""What a suite is made of: [`EvalPrompt`]s, what a model should do with each (`expect`), and how capability
suites are worded ([`PROMPT_FORMATS`])."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    context: str | None = None  # a contextual behavior's context (HarmBench), which its classifier reads apart

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the prompt in a results file."""
        return self.suite, self.id


class PromptFileError(ValueError):
    """A row of a prompt file that does not follow the format. Names the file, the row and the field."""

    def __init__(self, source: str, line: int, field_name: str, message: str):
        self.source, self.line, self.field_name = source, line, field_name
        super().__init__(f"{source}: line {line}, field '{field_name}': {message}")
