"""Which judge a run uses, from the command line's options: local guards (a vote when several), a Llama-Guard-style
`--classifier`, an OpenAI-compatible endpoint with a rubric, or none (`--no_judge`)."""

from __future__ import annotations

from typing import Any

from . import guards as guard_models
from .base import HARMFUL_SCORE_THRESHOLD, Judge
from .endpoint import OpenAIJudge
from .vote import VoteJudge


def make_judge(
    guard: str | None = None,
    classifier: str | None = None,
    no_judge: bool = False,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key: str | None = None,
    endpoint: dict[str, Any] | None = None,
    vote_min: int | None = None,
    guard_batch_size: int = 16,
    guard_max_tokens: int | None = None,
    classifier_batch_size: int = 16,
    dtype: str = "auto",
    threshold: int = HARMFUL_SCORE_THRESHOLD,
) -> Judge | None:
    """The run's judge.

    - `guard` (`llama-guard-3,wildguard=DIR,...`): the guards, loaded locally, voting (at least `vote_min` of them,
      default a strict majority); benign prompts go to the endpoint when one is configured (options or
      environment), else to the first guard that reads refusals, else to the refusal phrases.
    - `classifier`: a Llama-Guard-style model directory (`ClassifierJudge`).
    - `no_judge`: none; the rollouts are judged by a later run.
    - otherwise the endpoint (`judge_url`, `judge_model`, `judge_api_key` or the environment), with `endpoint`'s
      keyword arguments (`rubric`, `timeout`, `max_retries`, ...).
    """
    endpoint = endpoint or {}
    if guard is not None and classifier is not None:
        raise ValueError("--guard and --classifier both name a local judge: give one of them.")
    if vote_min is not None and guard is None:
        raise ValueError("--vote_min counts the votes of guards: give them with --guard.")
    if guard is not None:
        if no_judge:
            raise ValueError("--guard and --no_judge: give one of them.")
        pairs = guard_models.parse_guard_specs(guard)
        if vote_min is not None and not 1 <= vote_min <= len(pairs):
            raise ValueError(f"--vote_min {vote_min}: give a number from 1 to the {len(pairs)} guards named.")
        voters = [
            guard_models.load_guard(name, model, dtype, guard_batch_size, guard_max_tokens) for name, model in pairs
        ]
        refusal = None
        if OpenAIJudge.configured(judge_url, judge_model):
            refusal = OpenAIJudge.from_options(judge_url, judge_model, judge_api_key, **endpoint)
        return VoteJudge(voters, vote_min, refusal, threshold)
    if classifier is not None:
        from ..generation import load_eval_model
        from .classifier import ClassifierJudge

        return ClassifierJudge(*load_eval_model(classifier, dtype=dtype), batch_size=classifier_batch_size)
    if no_judge:
        return None
    return OpenAIJudge.from_options(judge_url, judge_model, judge_api_key, **endpoint)
