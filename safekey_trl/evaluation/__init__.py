"""Evaluate a trained model: safety (harmfulness), over-refusal and capability retention, judged per rollout.

- `suites`: the prompt suites (public benchmarks pinned on the Hub, local files) and how they load.
- `generation`: the chat template and prefill as in training; vLLM (tensor parallel, LoRA) or transformers.
- `judges`: harmfulness (two rubrics), three-class refusal, a batched Llama-Guard-style classifier.
- `scoring`: answer extraction and equivalence for capability suites; rates with confidence intervals.
- `runner`: generate, judge, and append one row per rollout to a results file that resumes.
- `report`: runs side by side as tables and charts.
- `presets`: named sets of suites with their settings (`paper`).
"""

from .generation import (
    PAPER_CAPABILITY_SAMPLING,
    PAPER_SAFETY_SAMPLING,
    Generator,
    LoraPlan,
    RenderedPrompt,
    SamplingSettings,
    TransformersGenerator,
    VLLMGenerator,
    load_eval_model,
    make_generator,
    plan_lora,
    render_prompt,
    vllm_available,
    vllm_engine_args,
    vllm_sampling_args,
)
from .judges import (
    ClassifierJudge,
    Judge,
    OpenAIJudge,
    Verdict,
    judge_messages,
    keyword_refusal,
    parse_guard_verdict,
    parse_harm_score,
    parse_refusal_class,
)
from .presets import PRESETS, Preset
from .report import build_report, summary_table, text_bar, write_charts
from .runner import ResultsFile, default_results_path, read_results, run_eval
from .scoring import (
    HARMFUL_SCORE_THRESHOLD,
    Rate,
    SuiteSummary,
    extract_answer,
    extract_choice,
    has_verdict,
    math_equivalent,
    score_capability,
    summarize,
    wilson_interval,
)
from .suites import (
    BENIGN,
    CAPABILITY,
    HARMFUL,
    SUITES,
    EvalPrompt,
    HubSuite,
    PromptFileError,
    load_prompt_file,
    load_suite,
    sample_prompts,
    with_prefill,
)

__all__ = [
    "BENIGN",
    "CAPABILITY",
    "HARMFUL",
    "HARMFUL_SCORE_THRESHOLD",
    "PAPER_CAPABILITY_SAMPLING",
    "PAPER_SAFETY_SAMPLING",
    "PRESETS",
    "SUITES",
    "ClassifierJudge",
    "EvalPrompt",
    "Generator",
    "HubSuite",
    "Judge",
    "LoraPlan",
    "OpenAIJudge",
    "Preset",
    "PromptFileError",
    "Rate",
    "RenderedPrompt",
    "ResultsFile",
    "SamplingSettings",
    "SuiteSummary",
    "TransformersGenerator",
    "VLLMGenerator",
    "Verdict",
    "build_report",
    "default_results_path",
    "extract_answer",
    "extract_choice",
    "has_verdict",
    "judge_messages",
    "keyword_refusal",
    "load_eval_model",
    "load_prompt_file",
    "load_suite",
    "make_generator",
    "math_equivalent",
    "parse_guard_verdict",
    "parse_harm_score",
    "parse_refusal_class",
    "plan_lora",
    "read_results",
    "render_prompt",
    "run_eval",
    "sample_prompts",
    "score_capability",
    "summarize",
    "summary_table",
    "text_bar",
    "vllm_available",
    "vllm_engine_args",
    "vllm_sampling_args",
    "wilson_interval",
    "write_charts",
    "with_prefill",
]
