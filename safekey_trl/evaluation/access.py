"""Gated datasets and models on the Hugging Face Hub: telling a gated refusal from other failures, and saying how to
get access instead of showing the Hub's traceback."""

from __future__ import annotations

import os


class GatedAccessError(ValueError):
    """A dataset or model the Hub would not hand over because its terms were not accepted (or no token was sent)."""


def is_gated(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) is the Hub refusing a gated repository: `GatedRepoError`, or the
    message `datasets` and `transformers` wrap it in ("... is a gated dataset on the Hub", "... a gated repo")."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ == "GatedRepoError" or "gated" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def gated_message(repo: str, kind: str = "dataset", how: str = "", local: str = "") -> str:
    """How to get a gated `repo` (`kind` dataset or model): where to accept its terms, how to log in, and the way
    round it (`local`: how to give a local copy)."""
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    token = "a token is set (HF_TOKEN)" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    steps = how or f"accept its terms on {page}"
    text = (
        f"{repo} is a gated {kind} on the Hugging Face Hub: {steps} while logged in to the Hub, then log in here "
        f"(`huggingface-cli login`, or set HF_TOKEN to a token of that account; {token}) and run again"
    )
    return text + (f"; or {local}." if local else ".")
