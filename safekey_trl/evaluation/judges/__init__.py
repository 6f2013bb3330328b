"""Judges: read a response and say how harmful it is (harmful prompts) or whether the model refused (benign ones).

- `base`: [`Verdict`] and [`Judge`], and what a judge reads of a prompt.
- `prompt`: [`JudgePrompt`], a judge's chat turns with `{request}`/`{response}`, hashed as written.
- `rubrics`: the package's rubrics (`project`, `reference`: 1–5 scores; XSTest's three refusal classes) and how
  their replies are read.
- `published`: judge prompts as their authors publish them, byte for byte (HarmBench's classifier, StrongREJECT's
  rubric, WildGuard's input).
- `strongreject`: StrongREJECT's rubric judge: its reply read by its own expression, its 0–1 score.
- `endpoint`: [`OpenAIJudge`], any of these rubrics behind an OpenAI-compatible endpoint.
- `classifier`: [`ClassifierJudge`], a Llama-Guard-style `--classifier` (unsafe 5, safe 1), and the refusal phrases.
- `guard_formats`: Llama-Guard-3, WildGuard, Qwen3Guard-Gen and the HarmBench classifier as their authors run them.
- `guards`: [`GuardJudge`], one of those run locally in batches, its input cut to its context and the cut counted.
- `vote`: [`VoteJudge`], several judges voting (harmful when at least k of m say so; a tie is compliance).
- `choice`: [`make_judge`], the judge a run's options name.

Every judge says how it judged ([`Judge.describe`]): its name, model, rubric and the SHA-256 of the rubric's text,
recorded in each result row. What a judge reads is chosen by the runner (`rendering.judged_text`: the trace, the
answer, or both, by default the judge's `default_part`; never a forced prefill, which is the attacker's text); a
multi-turn conversation is judged against its objective when it has one.
"""

from .base import (
    FULL_COMPLIANCE,
    FULL_REFUSAL,
    HARMFUL_SCORE_THRESHOLD,
    PARTIAL_REFUSAL,
    REFUSAL_CLASSES,
    Judge,
    Verdict,
    final_answer,
    format_conversation,
    judged_turns,
    refused_of,
)
from .choice import make_judge
from .classifier import REFUSAL_PHRASES, ClassifierJudge, keyword_refusal, parse_guard_verdict
from .endpoint import OpenAIJudge
from .guard_formats import (
    GUARDS,
    GuardFormat,
    GuardInput,
    GuardReading,
    parse_harmbench,
    parse_llama_guard,
    parse_qwen3guard,
    parse_wildguard,
)
from .guards import GuardJudge, guard_input, load_guard, parse_guard_specs
from .prompt import JudgePrompt
from .rubrics import (
    HARM_PROMPTS,
    REFUSAL_PROMPT,
    RUBRICS,
    judge_messages,
    parse_harm_score,
    parse_refusal_class,
)
from .strongreject import STRONGREJECT_PROMPT, parse_strongreject, strongreject_score
from .vote import VoteJudge, decide, vote_of

__all__ = [
    "FULL_COMPLIANCE",
    "FULL_REFUSAL",
    "GUARDS",
    "HARMFUL_SCORE_THRESHOLD",
    "HARM_PROMPTS",
    "PARTIAL_REFUSAL",
    "REFUSAL_CLASSES",
    "REFUSAL_PHRASES",
    "REFUSAL_PROMPT",
    "RUBRICS",
    "STRONGREJECT_PROMPT",
    "ClassifierJudge",
    "GuardFormat",
    "GuardInput",
    "GuardJudge",
    "GuardReading",
    "Judge",
    "JudgePrompt",
    "OpenAIJudge",
    "Verdict",
    "VoteJudge",
    "decide",
    "final_answer",
    "format_conversation",
    "guard_input",
    "judge_messages",
    "judged_turns",
    "keyword_refusal",
    "load_guard",
    "make_judge",
    "parse_guard_specs",
    "parse_guard_verdict",
    "parse_harm_score",
    "parse_harmbench",
    "parse_llama_guard",
    "parse_qwen3guard",
    "parse_refusal_class",
    "parse_strongreject",
    "parse_wildguard",
    "refused_of",
    "strongreject_score",
    "vote_of",
]
