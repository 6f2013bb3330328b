"""SafeKey's loss terms as pure functions of tensors, and the epoch schedule that switches them on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def span_mask(starts: torch.Tensor, ends: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean (batch, length) mask, true on `[starts[i], ends[i])` of each row."""
    positions = torch.arange(length, device=starts.device)
    return (positions >= starts.unsqueeze(1)) & (positions < ends.unsqueeze(1))


def query_masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_QMM summed over K's tokens, from the query-masked pass's logits at the positions that predict them (K tokens,
    vocab), and how many of them are the top-1 prediction."""
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(dim=-1) == targets).sum()


def safety_head_loss(
    understanding_logits: torch.Tensor, prefix_logits: torch.Tensor, unsafe: torch.Tensor, theta: float
) -> torch.Tensor:
    """Per-example θ·BCE(understanding path) + (1−θ)·BCE(prefix path) against "the query is harmful"."""
    target = unsafe.to(understanding_logits.dtype)
    understanding = F.binary_cross_entropy_with_logits(understanding_logits, target, reduction="none")
    prefix = F.binary_cross_entropy_with_logits(prefix_logits, target, reduction="none")
    return theta * understanding + (1 - theta) * prefix


def safety_head_predictions(
    understanding_logits: torch.Tensor, prefix_logits: torch.Tensor, theta: float
) -> torch.Tensor:
    """The head's verdict: the θ-weighted mix of the two paths' probabilities, thresholded at 0.5."""
    probability = theta * understanding_logits.sigmoid() + (1 - theta) * prefix_logits.sigmoid()
    return probability >= 0.5


def auxiliary_active(epoch: float | None, num_train_epochs: int, auxiliary_epochs: int) -> bool:
    """Whether the SafeKey terms are on during the epoch that `epoch` (Trainer's fractional count) is in.

    They are on for the last `auxiliary_epochs` of `num_train_epochs`. During epoch `e` (0-based) the Trainer's
    `state.epoch` runs from `e` (the end of the previous epoch) up to, not including, `e + 1`.
    """
    if auxiliary_epochs >= num_train_epochs:
        return True
    epoch_index = int(epoch or 0.0)
    return epoch_index >= num_train_epochs - auxiliary_epochs
