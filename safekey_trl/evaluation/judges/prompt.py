"""A judge's prompt: chat turns with `{request}` and `{response}` placeholders, hashed as written, and how its reply is
read."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

# A prompt's placeholders, any case: the request (or its aliases; StrongREJECT's is `{forbidden_prompt}`) and the
# response
_PLACEHOLDER = re.compile(r"\{(request|question|query|instruction|goal|forbidden_prompt|response)\}", re.IGNORECASE)
REQUEST_NAMES = ("request", "question", "query", "instruction", "goal", "forbidden_prompt")
# How a reply is read: a 1–5 score (a JSON `score`, `score: N`, ...), or StrongREJECT's `1.b`/`2.b`/`3.b` answers
REPLY_FORMATS = ("score", "strongreject")


@dataclass(frozen=True)
class JudgePrompt:
    """A judge's instructions: chat turns whose text holds `{request}` and `{response}` placeholders, filled by
    [`render`][JudgePrompt.render]. Its `sha256` (of the turns as written) goes into every row it judges; `reply`
    says how the judge's reply is read (see [`REPLY_FORMATS`])."""

    name: str
    turns: tuple[tuple[str, str], ...]  # (role, template)
    json_reply: bool = False  # ask the endpoint for a JSON object
    reply: str = "score"

    def __post_init__(self) -> None:
        if self.reply not in REPLY_FORMATS:
            raise ValueError(f"Unknown reply format {self.reply!r}: use {', '.join(REPLY_FORMATS)}.")

    @property
    def sha256(self) -> str:
        """The hash of the prompt as written: of a one-message prompt (a prompt file), its text's, as `sha256sum`
        gives it for the file; of several turns, of their roles and texts."""
        if len(self.turns) == 1 and self.turns[0][0] == "user":
            text = self.turns[0][1]
        else:
            text = "\0".join(f"{role}\0{template}" for role, template in self.turns)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def render(self, request: str, response: str) -> list[dict[str, str]]:
        """The chat, placeholders filled in one pass (a request holding `{response}` stays as it is)."""

        def value(match: re.Match) -> str:
            return request if match.group(1).lower() in REQUEST_NAMES else response

        return [{"role": role, "content": _PLACEHOLDER.sub(value, template)} for role, template in self.turns]

    @classmethod
    def from_file(cls, path: str | Path, json_reply: bool = False) -> JudgePrompt:
        """A prompt file of the user's: its whole text is the judge's one user message, with a `{request}` (or
        `{question}`, `{query}`, `{instruction}`, `{goal}`, `{forbidden_prompt}`; any case) and a `{response}`
        placeholder."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such judge prompt file")
        text = path.read_bytes().decode("utf-8")  # as written: no newline translation, so the hash is the file's
        found = {match.group(1).lower() for match in _PLACEHOLDER.finditer(text)}
        if not found & set(REQUEST_NAMES) or "response" not in found:
            raise ValueError(
                f"{path}: a judge prompt needs a {{request}} and a {{response}} placeholder (found "
                f"{', '.join(sorted(found)) or 'none'})."
            )
        return cls(f"file:{path.name}", (("user", text),), json_reply)
