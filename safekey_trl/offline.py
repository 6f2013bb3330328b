"""A Hub name that is not a local path and cannot be fetched: one error saying it is not in the local cache and the
machine is offline (or the Hub cannot be reached), instead of a library's connection message."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# How `datasets`, `transformers` and `huggingface_hub` say that they could not reach the Hub
_UNREACHABLE = (
    "OfflineModeIsEnabled",
    "offline mode",
    "couldn't connect",
    "Couldn't reach",
    "LocalEntryNotFound",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "Connection refused",
    "Network is unreachable",
)


def is_offline() -> bool:
    """Whether the Hub is switched off (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_hub_unreachable(error: BaseException) -> bool:
    """Whether `error` says the Hub could not be reached (offline, no network) rather than something else."""
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, (ConnectionError, OSError)) and any(marker in text for marker in _UNREACHABLE)


def unavailable(name: str, kind: str) -> FileNotFoundError:
    """The error for a `kind` ("dataset", "tokenizer", "model") named `name` that is neither local nor fetchable."""
    from huggingface_hub import constants

    where = f"not a local path, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if is_offline():
        why = "the machine is offline (HF_HUB_OFFLINE=1)"
    else:
        why = "the Hub cannot be reached from here"
    return FileNotFoundError(
        f"{kind} {name!r}: {where}, and {why}. Download it where the Hub is reachable (`hf download {name}"
        f"{' --repo-type dataset' if kind == 'dataset' else ''}`) into this cache, or give a local path."
    )


@contextlib.contextmanager
def hub_name(name: str, kind: str) -> Iterator[None]:
    """Turn an unreachable-Hub error while loading `name` into [`unavailable`]'s one line."""
    try:
        yield
    except Exception as error:
        if is_hub_unreachable(error):
            raise unavailable(name, kind) from None
        raise
