"""Presets: named sets of suites with the generation settings and judge rubric they are run with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .generation import PAPER_CAPABILITY_SAMPLING, PAPER_SAFETY_SAMPLING, SamplingSettings
from .suites import CAPABILITY, SUITES, suite_samples


@dataclass(frozen=True)
class Preset:
    """Suites to run, how to decode each kind, and the harmfulness rubric."""

    suites: tuple[str, ...]
    safety_sampling: SamplingSettings
    capability_sampling: SamplingSettings
    rubric: str = "project"
    notes: str = field(default="", compare=False)

    def sampling(self, suite: str) -> SamplingSettings:
        """The settings for one suite: capability suites sample with their benchmark's rollouts per prompt."""
        name = suite.partition("=")[0]
        if name in SUITES and SUITES[name].expect == CAPABILITY:
            return replace(self.capability_sampling, samples=suite_samples(suite))
        return self.safety_sampling


PRESETS: dict[str, Preset] = {
    # The SafeKey paper's Hub-hosted suites with the reference's generation settings and GPT-4o-style judge. Its
    # WildChat, AdvBench-prefilling and multi-turn sets are local files: add them with --suite.
    "paper": Preset(
        suites=("strongreject", "jailbreakbench", "wildjailbreak", "xstest", "aime24", "math500", "gpqa-diamond"),
        safety_sampling=PAPER_SAFETY_SAMPLING,
        capability_sampling=PAPER_CAPABILITY_SAMPLING,
        rubric="reference",
    ),
}
