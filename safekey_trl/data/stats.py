"""Dataset statistics for SafeKey data: label balance, U and K lengths in tokens, and what `max_length` would cut.

Lengths follow the training pipeline exactly: each example goes through `data.tokenize_example`, which renders it
and cuts its spans under the boundary rule, so U's length is `key_start - prompt_len` and K's is
`key_end - key_start` tokens. K is *cut* when its last token lies beyond `max_length` (`featurize` then trains the
LM term only), and an example is *dropped* when its prompt alone fills `max_length`; both counts match `featurize`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chat_formats import AUTO, ResolvedFormat, resolve_chat_format
from .featurize import tokenize_example
from .reading import load_examples
from .rows import InvalidRowReport, SafeKeyDataError, SafeKeyExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank percentile (`q` in 0..100) of a non-empty list: always one of the values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Distribution:
    """min / median / p90 / max of a list of lengths."""

    values: list[int]

    def describe(self) -> dict[str, float]:
        if not self.values:
            return {}
        return {
            "min": min(self.values),
            "median": statistics.median(self.values),
            "p90": percentile(self.values, 90),
            "max": max(self.values),
        }


@dataclass
class DataStats:
    """What [`compute_stats`] measured."""

    rows: int = 0
    harmful: int = 0
    benign: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    understanding_tokens: list[int] = field(default_factory=list)
    key_tokens: list[int] = field(default_factory=list)
    total_tokens: list[int] = field(default_factory=list)
    key_in_answer: int = 0
    max_length: int | None = None
    key_cut: int = 0
    dropped: int = 0
    lm_only: int = 0  # rows without U/K (plain SFT data in a mixture): counted, not measured
    report: InvalidRowReport = field(default_factory=InvalidRowReport)


def example_lengths(
    example: SafeKeyExample, tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO
) -> tuple[int, int, int, int]:
    """`(prompt_len, key_start, key_end, total)` token positions of one example, as `featurize` computes them."""
    tokenized = tokenize_example(example, tokenizer, chat_format)
    return tokenized.prompt_len, tokenized.key_start, tokenized.key_end, len(tokenized.input_ids)


def compute_stats(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    chat_format: str | ResolvedFormat = AUTO,
) -> DataStats:
    """Measure a SafeKey file; invalid rows are counted in `stats.report`, not measured."""
    examples, report = load_examples(path, skip_invalid=True)
    return compute_example_stats(examples, report, tokenizer, max_length, chat_format)


def compute_example_stats(
    examples: list[SafeKeyExample],
    report: InvalidRowReport,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    chat_format: str | ResolvedFormat = AUTO,
) -> DataStats:
    """Measure validated examples (`report`: the rows already found invalid); LM-only examples are only counted.
    They are rendered in `chat_format` (a family name, or one resolved with a recipe's settings)."""
    if not isinstance(chat_format, ResolvedFormat):
        chat_format = resolve_chat_format(tokenizer, chat_format)
    stats = DataStats(max_length=max_length, report=report)
    stats.rows = len(examples) + report.count
    for example in examples:
        if example.lm_only:
            stats.lm_only += 1
            continue
        try:
            prompt_len, key_start, key_end, total = example_lengths(example, tokenizer, chat_format)
        except SafeKeyDataError as error:
            report.errors.append(error)
            continue
        stats.harmful += example.unsafe
        stats.benign += not example.unsafe
        stats.key_in_answer += example.key_in_answer
        stats.prompt_tokens.append(prompt_len)
        stats.understanding_tokens.append(key_start - prompt_len)
        stats.key_tokens.append(key_end - key_start)
        stats.total_tokens.append(total)
        if max_length is not None:
            if prompt_len >= max_length:
                stats.dropped += 1
            elif key_end > max_length:
                stats.key_cut += 1
    return stats


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A plain-text histogram: one line per bin, `[low, high] count ####`."""
    if not values:
        return ["  (no values)"]
    low, high = min(values), max(values)
    bins = max(1, min(bins, high - low + 1))
    size = (high - low + 1) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / size))] += 1
    peak = max(counts)
    lines = []
    for index, count in enumerate(counts):
        start = low + math.ceil(index * size)
        end = low + math.ceil((index + 1) * size) - 1
        bar = "#" * max(1 if count else 0, round(width * count / peak))
        lines.append(f"  {start:>6}-{end:<6} {count:>6} {bar}")
    return lines


def render_stats(stats: DataStats, path: str = "") -> str:
    """The terminal report: counts, length distributions and histograms of U and K."""
    measured = len(stats.key_tokens)
    lines = [f"{path}: {stats.rows} rows, {measured} measured ({stats.harmful} harmful, {stats.benign} benign)"]
    if stats.lm_only:
        lines.append(f"  LM-only (no U/K, plain SFT): {stats.lm_only}")
    if measured:
        lines.append(f"  harmful share: {stats.harmful / measured:.1%}")
    if measured:
        lines.append(f"  K in the answer (outside the trace): {stats.key_in_answer}")
    if stats.report.duplicates:
        lines.append(f"  {stats.report.duplicates_summary()}")
    if stats.report.implausible:
        lines.append(f"  {stats.report.implausible_summary()}")
    if stats.report.count:
        lines.append(f"  invalid: {stats.report.count} (run `safekey-trl data validate` for the list)")
    for name, values in (
        ("prompt", stats.prompt_tokens),
        ("U (understanding)", stats.understanding_tokens),
        ("K (key sentence)", stats.key_tokens),
        ("whole example", stats.total_tokens),
    ):
        described = Distribution(values).describe()
        if described:
            summary = ", ".join(f"{key} {value:g}" for key, value in described.items())
            lines.append(f"  {name} tokens: {summary}")
    if stats.max_length is not None:
        lines.append(
            f"  max_length={stats.max_length}: K cut in {stats.key_cut}, dropped (prompt too long) {stats.dropped}"
        )
    for name, values in (("U tokens", stats.understanding_tokens), ("K tokens", stats.key_tokens)):
        if values:
            lines.append(f"  {name}:")
            lines += histogram(values)
    return "\n".join(lines)
