"""Which prompts of a suite a run asks, and the prefilling attack: a seeded draw, and a prefill forced on the prompts
it targets."""

from __future__ import annotations

from dataclasses import replace

from .prompts import HARMFUL, EvalPrompt


def sample_prompts(prompts: list[EvalPrompt], count: int | None, seed: int) -> list[EvalPrompt]:
    """`count` prompts drawn without replacement, in the order `datasets.Dataset.shuffle(seed)` puts them; all of
    them (in file order) when `count` is None or 0. The same seed draws the same prompts in every run."""
    if not count or count >= len(prompts):
        return list(prompts)
    import numpy as np

    return [prompts[int(i)] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]]


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
