"""`load_suite`: a suite by registry name, `NAME=FILE` (a local copy of a registry suite), or a local prompt file."""

from __future__ import annotations

from pathlib import Path

from .files import load_prompt_file
from .hub import load_hub_suite
from .prompts import DEFAULT_PROMPT_FORMAT, EvalPrompt
from .registry import CODE_SUITES, SUITES
from .selection import sample_prompts


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
    capability suites of the registry (see [`PROMPT_FORMATS`]). Code suites (LiveCodeBench, HumanEval) run
    model-written code and are refused here (see `CODE_SUITES`).
    """
    name, _, local = spec.partition("=")
    if name in CODE_SUITES:
        raise ValueError(CODE_SUITES[name])
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


def suite_samples(spec: str) -> int:
    """How many rollouts per prompt the suite's convention asks for (1 for a local file)."""
    name = spec.partition("=")[0]
    return SUITES[name].samples if name in SUITES else 1
