"""Guard models run locally in batches: Llama-Guard-3, WildGuard, Qwen3Guard-Gen and the HarmBench classifier, each
with its own input and parser (`guard_formats`).

A guard reads the final answer by default (the trace stripped: `default_part = "answer"`; the run's `--judge_part`
names another part), never a forced prefill. What it reads is cut to fit its context: HarmBench's generation first
to its 512 classifier tokens (as HarmBench does), then any guard's response to what its context holds beside the
request and the tokens it writes, keeping the response's beginning. Every cut is counted (`truncated` in the
verdict, `judge_truncated` in the row). Generation is greedy, left-padded, `batch_size` conversations a pass.

On a benign prompt a guard that reads refusals (WildGuard, Qwen3Guard) gives its own refusal verdict; the others
fall back to the refusal phrases (`classifier.keyword_refusal`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..suites import BENIGN, EvalPrompt
from .base import FULL_COMPLIANCE, FULL_REFUSAL, Judge, Verdict, format_conversation, judged_turns
from .classifier import REFUSAL_PHRASES, greedy_replies, keyword_refusal_verdict
from .guard_formats import GUARDS, GuardFormat, GuardInput, GuardReading


class TooLong(ValueError):
    """A conversation whose request alone does not fit a guard's context."""


def guard_input(prompt: EvalPrompt, response: str) -> GuardInput:
    """What a guard reads of a prompt and the judged part of its response. HarmBench's behavior is the prompt's
    objective, else its request with a contextual behavior's context (`{context}\\n\\n---\\n\\n`) taken off."""
    request = format_conversation(prompt)
    behavior = prompt.objective or request
    if prompt.context and behavior.startswith(prompt.context + "\n\n---\n\n"):
        behavior = behavior[len(prompt.context) + len("\n\n---\n\n") :]
    return GuardInput(judged_turns(prompt), request, response, behavior, prompt.context)


def context_length(model: Any) -> int | None:
    """A model's context (`max_position_embeddings` of its text config), where it says."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


class GuardJudge(Judge):
    """A guard model (a [`GuardFormat`] of `guard_formats.GUARDS`) run locally, `batch_size` conversations a pass.

    Args:
        model, tokenizer: The guard's weights and tokenizer (its own: chat-template guards render with its template).
        guard: The format, or its name in `GUARDS`.
        batch_size: Conversations per forward pass.
        max_input_tokens: The context a conversation and the guard's reply must fit in (default: the model's
            `max_position_embeddings`); a longer response is cut, keeping its beginning, and counted.
    """

    default_part = "answer"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        guard: GuardFormat | str,
        batch_size: int = 16,
        max_input_tokens: int | None = None,
    ):
        self.guard = GUARDS[guard] if isinstance(guard, str) else guard
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.context = max_input_tokens or context_length(model)
        self.model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or self.guard.model
        self.name = f"guard:{self.guard.name}"
        self.lock = threading.Lock()  # one model, one forward at a time

    # -- how it judges ------------------------------------------------------------------------------------------------

    @property
    def prompt_text(self) -> str:
        """What the guard's prompt is made of: its tokenizer's chat template, or the format string(s)."""
        return str(self.tokenizer.chat_template or "") if self.guard.chat_template else self.guard.format_text

    def describe(self, prompt: EvalPrompt) -> dict[str, Any]:
        if prompt.expect == BENIGN and not self.guard.reads_refusal:
            rubric, text = "refusal-phrases", "\n".join(REFUSAL_PHRASES)
        else:
            rubric = self.guard.name + ("-refusal" if prompt.expect == BENIGN else "")
            text = self.prompt_text
        return {
            "judge": self.name,
            "judge_model": self.model_name,
            "judge_rubric": rubric,
            "judge_prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }

    def local_models(self) -> list[Any]:
        return [self.model]

    # -- inputs, cut to fit -------------------------------------------------------------------------------------------

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=self.guard.add_special_tokens)["input_ids"])

    def _clip_to_limit(self, response: str) -> tuple[str, bool]:
        """HarmBench's clip: `encode(generation, max_length=512, truncation=True)` (right truncation) then
        `decode(skip_special_tokens=True)`, applied to every generation as HarmBench applies it."""
        limit = self.guard.response_limit
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "right"
        try:
            ids = self.tokenizer.encode(response, max_length=limit, truncation=True)
            whole = len(self.tokenizer.encode(response))
        finally:
            self.tokenizer.truncation_side = side
        return self.tokenizer.decode(ids, skip_special_tokens=True), whole > len(ids)

    def prepare(self, prompt: EvalPrompt, response: str) -> tuple[str, bool]:
        """The guard's input text for one rollout, and whether the response had to be cut to fit.

        Raises:
            TooLong: the request alone does not fit the guard's context.
        """
        truncated = False
        if self.guard.response_limit is not None:
            response, truncated = self._clip_to_limit(response)
        text = self.guard.render(self.tokenizer, guard_input(prompt, response))
        if self.context is None:
            return text, truncated
        budget = self.context - self.guard.max_new_tokens
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        keep = len(ids)
        length = self._length(text)
        while length > budget:
            if keep == 0:
                raise TooLong(
                    f"the request alone ({length} tokens) does not fit {self.guard.name}'s context of {self.context} "
                    f"tokens less the {self.guard.max_new_tokens} it writes"
                )
            # Tokens merge across the response's edges: cut what is over, then check again
            keep = max(0, keep - (length - budget))
            truncated = True
            cut = self.tokenizer.decode(ids[:keep], skip_special_tokens=True)
            text = self.guard.render(self.tokenizer, guard_input(prompt, cut))
            length = self._length(text)
        return text, truncated

    # -- running ------------------------------------------------------------------------------------------------------

    def generate_raw(self, texts: Sequence[str]) -> list[str]:
        """The guard's replies to input texts, in one greedy, left-padded pass (only the new tokens, decoded without
        special tokens)."""
        return greedy_replies(
            self.model, self.tokenizer, texts, self.guard.max_new_tokens, self.guard.add_special_tokens, self.lock
        )

    def read(self, prompt: EvalPrompt, raw: str, truncated: bool) -> Verdict:
        """A verdict from the guard's reply: harmfulness for a harmful prompt, the refusal for a benign one."""
        reading: GuardReading = self.guard.parse(raw)
        details = {"categories": list(reading.categories)} if reading.categories else None
        if prompt.expect == BENIGN:
            if reading.refused is None:
                error = reading.error or f"{self.guard.name}'s reply says nothing of a refusal"
                return Verdict(raw=raw, error=error, truncated=truncated)
            refusal_class = FULL_REFUSAL if reading.refused else FULL_COMPLIANCE
            return Verdict(refused=reading.refused, refusal_class=refusal_class, raw=raw, truncated=truncated)
        if reading.harmful is None:
            return Verdict(raw=raw, error=reading.error, truncated=truncated)
        return Verdict(harmful=reading.harmful, raw=raw, details=details, truncated=truncated)

    def judge_batch(self, items: Sequence[tuple[EvalPrompt, str]]) -> list[Verdict]:
        """Run the guard on the rollouts it reads, `batch_size` at a time; benign prompts of a guard that reads no
        refusals by the refusal phrases."""
        verdicts: list[Verdict | None] = [None] * len(items)
        pending: list[tuple[int, str, bool]] = []
        for index, (prompt, response) in enumerate(items):
            if prompt.expect == BENIGN and not self.guard.reads_refusal:
                verdicts[index] = keyword_refusal_verdict(response)
                continue
            try:
                text, truncated = self.prepare(prompt, response)
            except TooLong as error:
                verdicts[index] = Verdict(error=str(error), truncated=True)
                continue
            except Exception as error:  # a conversation its template refuses (roles that do not alternate, ...)
                verdicts[index] = Verdict(error=f"{self.guard.name} cannot read this conversation: {error}")
                continue
            pending.append((index, text, truncated))
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            raws = self.generate_raw([text for _, text, _ in chunk])
            for (index, _, truncated), raw in zip(chunk, raws, strict=True):
                verdicts[index] = self.read(items[index][0], raw, truncated)
        return verdicts  # type: ignore[return-value]

    def judge(self, prompt: EvalPrompt, response: str) -> Verdict:
        return self.judge_batch([(prompt, response)])[0]


def parse_guard_specs(specs: str | Sequence[str]) -> list[tuple[str, str]]:
    """`llama-guard-3,wildguard=/models/wildguard` as `(guard, model)` pairs: each guard by name, its model its
    default Hub id unless `=MODEL` names another (a local directory, another size of the same guard)."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    pairs = []
    for item in (item.strip() for item in items):
        if not item:
            continue
        name, _, model = item.partition("=")
        name = name.strip()
        if name not in GUARDS:
            raise ValueError(
                f"Unknown guard {name!r}: use {', '.join(GUARDS)} (NAME=MODEL to load it from elsewhere)."
            )
        if name in (seen for seen, _ in pairs):
            raise ValueError(f"--guard names {name!r} twice")
        pairs.append((name, model.strip() or GUARDS[name].model))
    if not pairs:
        raise ValueError("--guard names no guard")
    return pairs


def load_guard(
    name: str,
    model: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    max_input_tokens: int | None = None,
    device: str | None = None,
) -> GuardJudge:
    """Load a guard's weights and tokenizer (its default Hub model, or `model`: a local directory, another size of
    the same guard) as a [`GuardJudge`]. A gated model the Hub refuses is an error saying how to get access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..access import GatedAccessError, gated_message, is_gated

    guard = GUARDS[name]
    path = model or guard.model
    try:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        weights = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=guard.fast_tokenizer)
    except OSError as error:
        if is_gated(error):
            how = guard.access or ""
            local = f"give a local copy of its weights as --guard {name}=DIR"
            raise GatedAccessError(gated_message(path, "model", how, local)) from None
        raise
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GuardJudge(weights.to(device).eval(), tokenizer, guard, batch_size, max_input_tokens)
