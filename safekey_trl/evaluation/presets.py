"""Presets: named evaluation protocols, each stating where it comes from.

A preset is the suites to run, how to decode each kind (safety and over-refusal suites, capability suites), how the
capability suites are worded, and the harmfulness rubric. Every result row records the preset it was made under
(`preset`), and `eval-report` names it, with its source, beside each run's numbers.

- `safekey-reference` (alias `paper`): the SafeKey reference code's protocol throughout.
  Safety (benchmark/safe_benchmark/gen.py, config.py): no system prompt, greedy, repetition penalty 1.2, 8000 new
  tokens, one rollout. Capability (benchmark/reasoning_benchmark: simple_evals.py, sampler/local_sampler.py,
  run_all_evals.sh): greedy (its default temperature 0) with top-p 0.95 and repetition penalty 1.2, seed 46, 16384
  new tokens, one rollout; MATH-500 and GPQA worded by simple-evals' templates ("Answer: $ANSWER", "Answer:
  $LETTER"), AIME by the reference's own.
- `deepseek-r1`: DeepSeek-R1's protocol for the capability suites (its model card's evaluation section and usage
  recommendations): temperature 0.6, top-p 0.95, up to 32768 new tokens, 64 rollouts per problem averaged (pass@1),
  no repetition penalty; math worded with its `\\boxed{}` directive, GPQA with simple-evals' template. Its safety
  suites keep the SafeKey reference's protocol (the R1 report has none of its own for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .generation import PAPER_SAFETY_SAMPLING, SamplingSettings
from .suites import CAPABILITY, DEFAULT_PROMPT_FORMAT, SUITES, suite_samples

PAPER_SUITES = ("strongreject", "jailbreakbench", "wildjailbreak", "xstest", "aime24", "math500", "gpqa-diamond")
# The reference's reasoning benchmark: LocalSampler (temperature from --temperature, default 0; top-p 0.95;
# repetition penalty 1.2; seed from --random_seed), run by run_all_evals.sh with seed 46 and 16384 max tokens
REFERENCE_CAPABILITY_SAMPLING = SamplingSettings(
    max_new_tokens=16384, temperature=0.0, top_p=0.95, repetition_penalty=1.2, samples=1, seed=46
)
# DeepSeek-R1's model card: "maximum generation length 32,768 tokens; temperature 0.6, top-p 0.95, 64 responses per
# query to estimate pass@1"
R1_CAPABILITY_SAMPLING = SamplingSettings(
    max_new_tokens=32768, temperature=0.6, top_p=0.95, repetition_penalty=1.0, samples=64, seed=0
)


@dataclass(frozen=True)
class Preset:
    """A named protocol: suites, decoding per kind of suite, the capability suites' wording, the harmfulness rubric,
    and where it all comes from."""

    name: str
    suites: tuple[str, ...]
    safety_sampling: SamplingSettings
    capability_sampling: SamplingSettings
    source: str
    prompt_format: str = DEFAULT_PROMPT_FORMAT
    rubric: str = "reference"
    notes: str = field(default="", compare=False)

    def sampling(self, suite: str) -> SamplingSettings:
        """The settings for one suite (a name, or `name=FILE`)."""
        name = suite.partition("=")[0]
        if name in SUITES and SUITES[name].expect == CAPABILITY:
            return self.capability_sampling
        return self.safety_sampling


SAFEKEY_REFERENCE = Preset(
    name="safekey-reference",
    suites=PAPER_SUITES,
    safety_sampling=PAPER_SAFETY_SAMPLING,
    capability_sampling=REFERENCE_CAPABILITY_SAMPLING,
    prompt_format="safekey-reference",
    source=(
        "the SafeKey reference code (github.com/eric-ai-lab/SafeKey): benchmark/safe_benchmark/gen.py and config.py "
        "for safety; benchmark/reasoning_benchmark (simple_evals.py, sampler/local_sampler.py, run_all_evals.sh, "
        "math_eval.py, gpqa_eval.py, aime_eval.py) for capability"
    ),
)
DEEPSEEK_R1 = Preset(
    name="deepseek-r1",
    suites=PAPER_SUITES,
    safety_sampling=PAPER_SAFETY_SAMPLING,
    capability_sampling=R1_CAPABILITY_SAMPLING,
    prompt_format="r1",
    source=(
        "DeepSeek-R1's model card (huggingface.co/deepseek-ai/DeepSeek-R1: evaluation section and usage "
        "recommendations) for capability; the SafeKey reference's gen.py for safety"
    ),
)
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (SAFEKEY_REFERENCE, DEEPSEEK_R1)}
PRESET_ALIASES = {"paper": "safekey-reference"}


def get_preset(name: str) -> Preset:
    """A preset by name (or alias); an unknown name is an error listing them."""
    preset = PRESETS.get(PRESET_ALIASES.get(name, name))
    if preset is None:
        names = sorted([*PRESETS, *PRESET_ALIASES])
        raise ValueError(f"Unknown preset {name!r}: use one of {', '.join(names)}.")
    return preset


def suite_sampling(suite: str, preset: Preset | None = None, **overrides: object) -> SamplingSettings:
    """How to decode one suite: the preset's settings for its kind (without one, the reference's safety protocol,
    greedy, for every suite), then the options given (`temperature=0.6`, ...). Sampled without a preset and without
    `samples`, a suite takes its benchmark's rollouts per prompt (AIME: 8); greedy rollouts would all be the same."""
    settings = replace(preset.sampling(suite) if preset is not None else PAPER_SAFETY_SAMPLING, **overrides)
    if preset is None and "samples" not in overrides and not settings.greedy:
        settings = replace(settings, samples=suite_samples(suite))
    return settings
