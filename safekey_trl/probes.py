"""Probe metrics that need no judge, on held-out SafeKey-format data.

- **Safety head**: accuracy and AUROC of the Dual-Path Safety Head (each path, and the θ-mix the trainer uses) on
  the last hidden states of a full-attention pass, as in training.
- **K-token accuracy**: top-1 accuracy of the model on the key sentence K's tokens, with full attention and with the
  query hidden from attention (the Query-Mask Modeling pass). SafeKey trains the second to follow from U alone.
- **Attention shares**: for each K token, the attention mass it puts on the query (prompt) positions and on the
  query understanding U, averaged over layers and heads, then over the example's K tokens, then over examples.
  SafeKey is meant to shift K's attention from the query towards U.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .heads import DualPathSafetyHead
from .losses import span_mask


def auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve by ranks (the Mann–Whitney U statistic); tied scores share their average rank.

    Equals the probability that a random positive scores above a random negative, ties counting one half. NaN
    when either class is absent.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    positives = sum(bool(label) for label in labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average = (start + end) / 2 + 1  # ranks are 1-based
        for position in range(start, end + 1):
            ranks[order[position]] = average
        start = end + 1
    positive_rank_sum = sum(rank for rank, label in zip(ranks, labels, strict=True) if label)
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


@dataclass
class ProbeMetrics:
    """The probe metrics over a held-out set. Head fields are None without a head."""

    examples: int
    key_tokens: int
    key_accuracy: float
    key_accuracy_masked: float
    attention_query_share: float
    attention_understanding_share: float
    attention_query_share_masked: float
    attention_understanding_share_masked: float
    head_accuracy: float | None = None
    head_auroc: float | None = None
    understanding_accuracy: float | None = None
    understanding_auroc: float | None = None
    prefix_accuracy: float | None = None
    prefix_auroc: float | None = None
    per_example: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self, per_example: bool = False) -> dict[str, Any]:
        """The metrics as a dict (NaN as None, for JSON), with the per-example values when asked."""
        values = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        if not per_example:
            values.pop("per_example")
        return values


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the block with eager attention, the one implementation that returns attention weights."""
    current = model.config._attn_implementation
    if current == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@contextlib.contextmanager
def attention_mass(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Sum, over layers and averaged over heads, the attention mass each position puts on two sets of positions.

    Before a forward, set `state["targets"]` to a dict of name → (batch, length) boolean masks and `state["sums"]`
    to `{}`, `state["layers"]` to 0; after it, `state["sums"][name]` holds (batch, length) sums over layers and
    `state["layers"]` the layer count. Each attention
    layer's weights are reduced as they are produced, so memory stays at one layer's weights, where
    `output_attentions=True` would keep every layer's (batch, heads, length, length) tensor at once.
    """
    state: dict[str, Any] = {"targets": {}, "sums": {}, "layers": 0}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("The attention layer returned no weights: run the model with eager attention.")
        weights = weights.float().mean(dim=1)  # (batch, query position, key position), averaged over heads
        for name, targets in state["targets"].items():
            mass = (weights * targets[:, None, : weights.shape[-1]].to(weights.dtype)).sum(dim=-1)
            state["sums"][name] = state["sums"].get(name, 0) + mass
        state["layers"] += 1

    handles = [
        module.register_forward_hook(hook) for name, module in model.named_modules() if name.endswith("self_attn")
    ]
    if not handles:
        raise RuntimeError(f"{type(model).__name__} has no `self_attn` modules to read attention from.")
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def _pad(rows: Sequence[dict[str, Any]], name: str, value: int, length: int) -> torch.Tensor:
    tensor = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        tensor[i, : len(row[name])] = torch.as_tensor(row[name], dtype=torch.long)
    return tensor


def _forward(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, predicts_key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states, and the logits at the positions that predict a K token, (K tokens, vocab).

    The backbone and the LM head are called apart so that one pass gives both, and only K's positions go through the
    LM head (a full-vocabulary projection of every position would dwarf the rest on long traces).
    """
    hidden_states = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    logits = model.get_output_embeddings()(hidden_states[predicts_key])
    return hidden_states, logits.float()


@torch.inference_mode()
def probe_metrics(
    model: PreTrainedModel,
    dataset: Sequence[dict[str, Any]],
    pad_token_id: int,
    head: DualPathSafetyHead | None = None,
    theta: float = 0.5,
    batch_size: int = 4,
    progress: bool = False,
) -> ProbeMetrics:
    """Compute the probe metrics on featurized SafeKey rows (from [`load_safekey_dataset`]).

    Rows whose K was cut by `max_length` are left out. Two forward passes per batch, both in eager attention (the
    model is switched for the call and back): one with full attention (the head, K-token accuracy, attention shares)
    and one with the query masked out of attention exactly as in the trainer's QMM pass.

    Args:
        model: The causal LM.
        dataset: Featurized rows: `input_ids`, `key_mask`, `query_mask`, `understanding_span`, `prefix_end`, `unsafe`.
        pad_token_id: The id to pad `input_ids` with (right padding; masked out of attention).
        head: The safety head; head metrics are None without it.
        theta: The θ mixing the head's two paths, as in training.
        batch_size: Rows per forward pass.
        progress: Show a progress bar.
    """
    rows = [row for row in dataset if any(row["key_mask"])]
    if not rows:
        raise ValueError("No row has its key sentence K within max_length: nothing to probe.")
    device = model.device
    if head is not None:
        head = head.to(device).eval()
    model.eval()
    key_tokens = key_correct = key_correct_masked = 0
    per_example: list[dict[str, Any]] = []

    from rich.progress import Progress

    with eager_attention(model), attention_mass(model) as mass, Progress(disable=not progress) as bar:
        task = bar.add_task("probing", total=len(rows))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            length = max(len(row["input_ids"]) for row in batch)
            input_ids = _pad(batch, "input_ids", pad_token_id, length).to(device)
            attention = _pad(batch, "query_mask", 0, length).to(device)
            attention_full = torch.zeros_like(attention)
            for i, row in enumerate(batch):
                attention_full[i, : len(row["input_ids"])] = 1
            key_mask = _pad(batch, "key_mask", 0, length).to(device).bool()
            understanding = torch.tensor([row["understanding_span"] for row in batch], device=device)
            prefix_end = torch.tensor([row["prefix_end"] for row in batch], device=device)
            unsafe = [bool(row["unsafe"]) for row in batch]
            # Position p predicts token p + 1
            predicts_key = torch.zeros_like(key_mask)
            predicts_key[:, :-1] = key_mask[:, 1:]
            targets = input_ids[:, 1:][predicts_key[:, :-1]]
            query_positions = span_mask(torch.zeros_like(understanding[:, 0]), understanding[:, 0], length)
            understanding_positions = span_mask(understanding[:, 0], understanding[:, 1], length)

            shares = {}
            for name, mask in (("full", attention_full), ("masked", attention)):
                targets_by_name = {"query": query_positions, "understanding": understanding_positions}
                mass.update(targets=targets_by_name, sums={}, layers=0)
                states, logits = _forward(model, input_ids, mask, predicts_key)
                correct = int((logits.argmax(dim=-1) == targets).sum())
                if name == "full":
                    key_correct += correct
                    hidden_states = states
                else:
                    key_correct_masked += correct
                # Per example: mean over its K tokens of the layer-averaged mass
                key_count = key_mask.sum(dim=1).float()
                for target in ("query", "understanding"):
                    total = (mass["sums"][target] / mass["layers"] * key_mask).sum(dim=1) / key_count
                    shares[f"{target}_share" + ("" if name == "full" else "_masked")] = total.tolist()
            key_tokens += int(targets.numel())

            head_probabilities: dict[str, list[float]] = {}
            if head is not None:
                understanding_mask = span_mask(understanding[:, 0], understanding[:, 1], length)
                prefix_mask = span_mask(torch.zeros_like(prefix_end), prefix_end, length)
                understanding_logits, prefix_logits = head(hidden_states, understanding_mask, prefix_mask)
                head_probabilities = {
                    "understanding_probability": understanding_logits.float().sigmoid().tolist(),
                    "prefix_probability": prefix_logits.float().sigmoid().tolist(),
                }
            for i in range(len(batch)):
                example = {"unsafe": unsafe[i], **{name: values[i] for name, values in shares.items()}}
                example.update({name: values[i] for name, values in head_probabilities.items()})
                per_example.append(example)
            bar.advance(task, len(batch))

    def mean(name: str) -> float:
        return sum(example[name] for example in per_example) / len(per_example)

    metrics = ProbeMetrics(
        examples=len(per_example),
        key_tokens=key_tokens,
        key_accuracy=key_correct / key_tokens,
        key_accuracy_masked=key_correct_masked / key_tokens,
        attention_query_share=mean("query_share"),
        attention_understanding_share=mean("understanding_share"),
        attention_query_share_masked=mean("query_share_masked"),
        attention_understanding_share_masked=mean("understanding_share_masked"),
        per_example=per_example,
    )
    if head is not None:
        labels = [example["unsafe"] for example in per_example]
        understanding_p = [example["understanding_probability"] for example in per_example]
        prefix_p = [example["prefix_probability"] for example in per_example]
        # The trainer's verdict: the θ-mix of the two paths' probabilities, thresholded at 0.5
        mixed = [theta * u + (1 - theta) * p for u, p in zip(understanding_p, prefix_p, strict=True)]

        def accuracy(probabilities: list[float]) -> float:
            return sum((p >= 0.5) == label for p, label in zip(probabilities, labels, strict=True)) / len(labels)

        metrics.head_accuracy, metrics.head_auroc = accuracy(mixed), auroc(mixed, labels)
        metrics.understanding_accuracy, metrics.understanding_auroc = (
            accuracy(understanding_p),
            auroc(understanding_p, labels),
        )
        metrics.prefix_accuracy, metrics.prefix_auroc = accuracy(prefix_p), auroc(prefix_p, labels)
    return metrics
