"""An LLM judge behind any OpenAI-compatible endpoint (through `safekey_trl.llm_client`).

Harmful prompts are judged with a [`JudgePrompt`]: the package's `project` or `reference` rubric (a 1–5 score),
StrongREJECT's published rubric (`strongreject`: a 0–1 score from its three answers), or a prompt file of the
user's (a 1–5 score). Benign prompts get XSTest's three refusal classes.
"""

from __future__ import annotations

import os
from typing import Any

from ...llm_client import ChatClient, LLMRequestError
from ..suites import BENIGN, EvalPrompt
from .base import Judge, Verdict, format_conversation, refused_of
from .prompt import JudgePrompt
from .rubrics import HARM_PROMPTS, REFUSAL_PROMPT, RUBRICS, parse_harm_score, parse_refusal_class
from .strongreject import parse_strongreject, strongreject_score


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM's server, llama.cpp, ...).

    Args:
        base_url: The API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
        model: The judge model's name at that endpoint.
        api_key: Sent as a bearer token when given.
        timeout: Seconds to wait for one reply.
        max_retries: Tries after the first on a failed request or a reply with no verdict in it.
        backoff: Seconds before the first retry, doubled at each further one.
        max_workers: Prompts judged at once.
        rubric: The harmfulness rubric: `project`, `reference`, `strongreject` (see `rubrics`, `strongreject`), or a
            [`JudgePrompt`] (a user's prompt file, [`JudgePrompt.from_file`]).
        max_tokens: The judge's output limit; the default leaves room for the reference rubric's analysis.
        refusal_prompt: The refusal judge's prompt for benign prompts (XSTest's three classes by default).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        max_workers: int = 8,
        rubric: str | JudgePrompt = "project",
        max_tokens: int | None = None,
        refusal_prompt: JudgePrompt | None = None,
    ):
        if isinstance(rubric, str) and rubric not in HARM_PROMPTS:
            raise ValueError(f"Unknown judge rubric {rubric!r}: use {', '.join(RUBRICS)}, or a prompt file.")
        self.harm_prompt = HARM_PROMPTS[rubric] if isinstance(rubric, str) else rubric
        self.refusal_prompt = refusal_prompt or REFUSAL_PROMPT
        self.rubric, self.model, self.max_workers = self.harm_prompt.name, model, max_workers
        self.max_tokens = max_tokens or (512 if self.harm_prompt.name == "project" else 1024)
        self.client = ChatClient(
            base_url,
            model,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=60.0,
            max_tokens=self.max_tokens,
        )
        self.name = f"openai:{model}" + ("" if self.harm_prompt.name == "project" else f":{self.harm_prompt.name}")

    @classmethod
    def from_options(cls, base_url: str | None, model: str | None, api_key: str | None, **kwargs: Any) -> OpenAIJudge:
        """Fill what the options leave out from `SAFEKEY_JUDGE_BASE_URL` / `SAFEKEY_JUDGE_MODEL` /
        `SAFEKEY_JUDGE_API_KEY`, then `OPENAI_BASE_URL` / `OPENAI_API_KEY`."""
        base_url = base_url or os.environ.get("SAFEKEY_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("SAFEKEY_JUDGE_MODEL")
        api_key = api_key or os.environ.get("SAFEKEY_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not base_url or not model:
            raise ValueError(
                "The judge needs a base URL and a model: --judge-url/--judge-model or SAFEKEY_JUDGE_BASE_URL/"
                "SAFEKEY_JUDGE_MODEL (or --guard for local guard models, --classifier for a local classifier, "
                "--no-judge to only generate)."
            )
        return cls(base_url, model, api_key, **kwargs)

    @staticmethod
    def configured(base_url: str | None, model: str | None) -> bool:
        """Whether the options or the environment name an endpoint and a model (see [`from_options`])."""
        base_url = base_url or os.environ.get("SAFEKEY_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        return bool(base_url and (model or os.environ.get("SAFEKEY_JUDGE_MODEL")))

    def prompt_for(self, prompt: EvalPrompt) -> JudgePrompt:
        """The judge prompt for a prompt's kind."""
        return self.refusal_prompt if prompt.expect == BENIGN else self.harm_prompt

    def describe(self, prompt: EvalPrompt) -> dict[str, Any]:
        used = self.prompt_for(prompt)
        return {
            "judge": self.name,
            "judge_model": self.model,
            "judge_rubric": used.name,
            "judge_prompt_sha256": used.sha256,
        }

    def judge(self, prompt: EvalPrompt, response: str) -> Verdict:
        """Ask the endpoint, retrying with backoff; a verdict with `error` set when every try failed."""
        used = self.prompt_for(prompt)
        messages = used.render(format_conversation(prompt), response)
        extra = {"response_format": {"type": "json_object"}} if used.json_reply else {}

        def parse(raw: str) -> Verdict:
            if prompt.expect == BENIGN:
                refusal_class = parse_refusal_class(raw)
                if refusal_class is not None:
                    return Verdict(refused=refused_of(refusal_class), refusal_class=refusal_class, raw=raw)
            elif used.reply == "strongreject":
                answers = parse_strongreject(raw)  # a ValueError when unreadable: asked again
                return Verdict(rubric_score=strongreject_score(**answers), details=answers, raw=raw)
            else:
                score = parse_harm_score(raw)
                if score is not None:
                    return Verdict(score=score, raw=raw)
            raise ValueError("no verdict in the judge's reply")

        try:
            verdict, _, _ = self.client.ask(messages, parse, **extra)
        except LLMRequestError as failure:
            return Verdict(raw=getattr(failure, "raw", ""), error=str(failure))
        return verdict
