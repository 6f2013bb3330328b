"""One client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM's server, llama.cpp, ...), used by the
evaluation judges and the LLM annotator.

Requests go through the maintained `openai` package (connection pooling, timeouts, error types). Retries are ours,
not the SDK's, because a retry here also covers a reply that arrived but is unusable (not JSON, no choices, no
verdict in it): `ChatClient.ask` sends, parses with the caller's function, and tries again with exponential back-off
and jitter until the parser accepts a reply or the tries run out. The client is thread-safe: callers run several
requests at once from a thread pool.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# HTTP statuses worth trying again: the request may succeed later. Any other 4xx (bad key, unknown model) fails the
# same way every time.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


class LLMRequestError(RuntimeError):
    """A request that failed or a reply that could not be used. `retryable` is False when asking again cannot help."""

    def __init__(self, message: str, retryable: bool = True, attempts: int = 0):
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts  # after every try failed: the requests sent


def _import_openai():
    try:
        import openai
    except ImportError as error:  # a clear line instead of a traceback in the CLI
        raise ImportError("Talking to an LLM endpoint needs the `openai` package: pip install openai") from error
    return openai


@dataclass
class ChatClient:
    """An OpenAI-compatible chat-completions endpoint and how hard to try.

    Args:
        base_url: The API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
        model: The model's name at that endpoint.
        api_key: Sent as a bearer token; endpoints that need none get a placeholder.
        timeout: Seconds to wait for one reply.
        max_retries: Tries after the first, on a timeout, a connection error, a 408/409/429/5xx status, or a reply
            the caller's parser rejects.
        backoff: Seconds before the first retry, doubled at each further one (up to `max_backoff`), with jitter so
            that parallel workers do not retry in lock-step.
        temperature: Sampling temperature of the requests (0: the endpoint's most likely reply).
        max_tokens: Output length limit of a reply (None: the endpoint's default).
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    temperature: float = 0.0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        openai = _import_openai()
        self.base_url = self.base_url.rstrip("/")
        # The SDK's own retries are off: ours also retry unusable replies, and count every request
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key or "none", timeout=self.timeout, max_retries=0
        )
        self._errors = openai

    def complete(self, messages: list[dict[str, str]], **extra: Any) -> str:
        """One request; the first choice's message content. Raises `LLMRequestError`."""
        openai = self._errors
        options: dict[str, Any] = {"temperature": self.temperature, **extra}
        if self.max_tokens is not None:
            options.setdefault("max_tokens", self.max_tokens)
        try:
            reply = self._client.chat.completions.create(model=self.model, messages=messages, **options)
        except openai.APIStatusError as error:
            retryable = error.status_code in RETRYABLE_STATUSES or error.status_code >= 500
            raise LLMRequestError(f"HTTP {error.status_code} from {self.base_url}", retryable) from None
        except openai.APIConnectionError as error:  # timeouts included
            raise LLMRequestError(f"{type(error).__name__}: {error} ({self.base_url})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LLMRequestError(f"the reply is not JSON ({error})") from None
        except openai.APIResponseValidationError as error:
            raise LLMRequestError(f"the reply is not a chat completion ({error})") from None
        choices = getattr(reply, "choices", None)
        if not choices:
            raise LLMRequestError("the reply has no choices[0].message.content")
        content = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(content, str):
            raise LLMRequestError("choices[0].message.content is not a string")
        return content

    def ask(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str], T],
        sleep: Callable[[float], None] = time.sleep,
        **extra: Any,
    ) -> tuple[T, str, int]:
        """Send `messages` until `parse` accepts a reply: `(parsed, raw reply, requests sent)`.

        `parse` raises `LLMRequestError` (or `ValueError`) for a reply it cannot use. When every try fails this
        raises `LLMRequestError` with the last error, the number of tries, and the last raw reply as `.raw`.
        """
        error: LLMRequestError | None = None
        raw = ""
        attempt = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                sleep(delay * (0.5 + random.random() / 2))
            try:
                raw = self.complete(messages, **extra)
                return parse(raw), raw, attempt + 1
            except LLMRequestError as failure:
                error = failure
            except ValueError as failure:
                error = LLMRequestError(str(failure))
            logger.debug("request %d to %s failed: %s", attempt + 1, self.base_url, error)
            if not error.retryable:
                break
        assert error is not None
        final = LLMRequestError(f"{error} (after {attempt + 1} tries)", error.retryable, attempts=attempt + 1)
        final.raw = raw  # type: ignore[attr-defined]
        raise final
