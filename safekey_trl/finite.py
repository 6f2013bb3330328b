"""Non-finite training steps: which values a step checks, and the error that stops training on one.

Each optimizer step checks, over all its micro-batches and on every process, the total loss, each SafeKey term
(`lm_loss`, `qmm_loss`, `head_loss`) and the gradient norm TRL computes for clipping. One gather makes the decision
the same on every process. `SafeKeyConfig.non_finite_loss` chooses what a non-finite step does: stop before the
optimizer step (the weights keep their last finite values, so no checkpoint ever holds NaN) or skip it.
"""

from __future__ import annotations

import torch

# The order of the per-step flags: the terms `compute_loss` checks, then the gradient norm
LOSS_TERMS = ("lm_loss", "qmm_loss", "head_loss", "loss")
CHECKED = (*LOSS_TERMS, "grad_norm")


class NonFiniteLossError(ValueError):
    """Training stopped on a step whose loss or gradient norm is NaN or infinite (`non_finite_loss: stop`)."""

    def __init__(self, step: int, terms: list[str], message: str):
        self.step = step
        self.terms = terms
        super().__init__(message)


def loss_flags(lm_loss: torch.Tensor, qmm: torch.Tensor | None, head: torch.Tensor | None, loss: torch.Tensor):
    """1.0 for each of [`LOSS_TERMS`] that is not finite in this micro-batch (a term that did not run is finite)."""
    zero = torch.zeros((), device=lm_loss.device)

    def bad(value: torch.Tensor | None) -> torch.Tensor:
        return zero if value is None else (~torch.isfinite(value.detach().float())).any().float()

    return torch.stack([bad(lm_loss), bad(qmm), bad(head), bad(loss)])


def describe(terms: list[str]) -> str:
    """`"lm_loss, the total loss and the gradient norm"` for the flagged terms."""
    names = {"loss": "the total loss", "grad_norm": "the gradient norm"}
    words = [names.get(term, term) for term in terms]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
