"""From a validated example to the trainer's features: rendering in the model family's format, tokenizing, and
placing U and K on tokens.

Every token span is computed from character offsets of the full rendered text through the fast tokenizer's offset
mapping. **Boundary rule:** a token belongs to the segment (prompt, U, K, rest) that holds its first character. A
token straddling U/K therefore belongs to U when it starts inside U, and K's tokens decode to K's text, possibly
missing a head that shares a token with U's last characters and possibly running on into the characters that share
K's last token.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat_formats import AUTO, ChatFormatError, ResolvedFormat, map_offset, render_turn, resolve_chat_format
from .reading import load_examples
from .rows import THINK_CLOSE, THINK_OPEN, InvalidRowReport, SafeKeyDataError, SafeKeyExample

if TYPE_CHECKING:
    from datasets import Dataset, Features
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The per-example features the SafeKey trainer reads beside `input_ids` and `labels`.
SAFEKEY_FEATURES = ("key_mask", "query_mask", "understanding_span", "prefix_end", "unsafe")


@dataclass
class FeaturizeStats:
    """Counts from `featurize`: rows in, rows out, and what truncation did."""

    rows: int = 0
    examples: int = 0
    key_truncated: int = 0
    dropped_no_response: int = 0
    lm_only: int = 0  # examples without U/K (plain SFT data in a mixture), kept: they train the LM term only


@dataclass
class RenderedExample:
    """The full text of one example and the character boundaries of its segments in it."""

    text: str
    prompt_end: int  # end of the rendered prompt (generation prompt included)
    understanding_end: int  # end of U
    key_end: int  # end of K


def render(
    example: SafeKeyExample, tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO
) -> RenderedExample:
    """Render an example in the format of the tokenizer's chat template, and map U and K into the rendering.

    The family comes from `tokenizer.chat_template` (or is named by `chat_format`, see
    [`~safekey_trl.data.chat_formats.resolve_chat_format`]); the trace and the answer go where that family's template
    reads them, and the rendered text is what the template renders for the conversation, its prompt part what it
    renders at inference. U's and K's ends, character offsets into the SafeKey response, map into the rendered trace or
    answer by character offsets (a template that strips a trace's or an answer's ends shifts them accordingly).
    """
    resolved = chat_format if isinstance(chat_format, ResolvedFormat) else resolve_chat_format(tokenizer, chat_format)
    response = example.response
    if example.lm_only and not (response.startswith(THINK_OPEN) and THINK_CLOSE in response):
        # Plain SFT data without a reasoning trace: the whole response is the answer, after an empty trace
        response = THINK_OPEN + THINK_CLOSE.lstrip("\n") + response
    close = response.index(THINK_CLOSE)
    trace_bounds = (min(len(THINK_OPEN), close), close)  # `<think>\n</think>\n\n`: an empty trace
    answer_start = close + len(THINK_CLOSE)
    trace, answer = response[trace_bounds[0] : close], response[answer_start:]
    try:
        turn = render_turn(example.prompt_messages, trace, answer, tokenizer, resolved)
    except ChatFormatError as error:
        raise SafeKeyDataError(example.source, example.row, "response", str(error)) from None
    if example.lm_only:  # no U or K: both end where the prompt does
        return RenderedExample(turn.text, turn.prompt_end, turn.prompt_end, turn.prompt_end)
    return RenderedExample(
        text=turn.text,
        prompt_end=turn.prompt_end,
        understanding_end=map_offset(example.summary_end_idx, trace_bounds, answer_start, turn),
        key_end=map_offset(example.next_sentence_end_idx, trace_bounds, answer_start, turn),
    )


def token_spans(token_starts: list[int], rendered: RenderedExample) -> tuple[int, int, int]:
    """Token indices where the response, K and the rest begin: `(prompt_len, key_start, key_end)`.

    Tokens are assigned by the boundary rule: to the segment holding their first character. So U's tokens are
    `[prompt_len, key_start)` and K's are `[key_start, key_end)`.
    """
    prompt_len = bisect.bisect_left(token_starts, rendered.prompt_end)
    key_start = bisect.bisect_left(token_starts, rendered.understanding_end)
    key_end = bisect.bisect_left(token_starts, rendered.key_end)
    return prompt_len, key_start, key_end


def tokenize_prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase, text: str, prompt_end: int
) -> tuple[list[int], list[int]]:
    """Token ids of `text` and each token's first character: the prompt `text[:prompt_end]` tokenized alone, as
    `apply_chat_template(..., add_generation_prompt=True)` tokenizes it at inference, then the completion after it.

    Tokenizing the whole text at once can merge the generation prompt's tail with the completion's head (R1's
    `<think>\n` and an empty trace's `\n` become one `\n\n` token under Qwen's and Llama 3's pre-tokenizers): the
    model would train on a prompt it never sees at inference.
    """
    ids: list[int] = []
    starts: list[int] = []
    for offset, part in ((0, text[:prompt_end]), (prompt_end, text[prompt_end:])):
        encoding = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        ids += encoding["input_ids"]
        starts += [offset + start for start, _ in encoding["offset_mapping"]]
    return ids, starts


@dataclass
class TokenizedExample:
    """An example's tokens and its segments' token boundaries, before any truncation: the prompt is
    `[0, prompt_len)`, U `[prompt_len, key_start)`, K `[key_start, key_end)`, the rest `[key_end, len(input_ids))`."""

    input_ids: list[int]
    prompt_len: int
    key_start: int
    key_end: int


def tokenize_example(
    example: SafeKeyExample, tokenizer: PreTrainedTokenizerBase, chat_format: str | ResolvedFormat = AUTO
) -> TokenizedExample:
    """Render and tokenize an example, and place its segments by the boundary rule.

    Raises [`SafeKeyDataError`] when U or K gets no token of its own under this tokenizer.
    """
    rendered = render(example, tokenizer, chat_format)
    input_ids, starts = tokenize_prompt_and_completion(tokenizer, rendered.text, rendered.prompt_end)
    prompt_len, key_start, key_end = token_spans(starts, rendered)
    if example.lm_only:
        return TokenizedExample(input_ids, prompt_len, prompt_len, prompt_len)
    if key_start == prompt_len:
        raise SafeKeyDataError(
            example.source, example.row, "summary_end_idx", "the understanding U has no token of its own"
        )
    if key_end == key_start:
        raise SafeKeyDataError(
            example.source, example.row, "next_sentence_end_idx", "the key sentence K has no token of its own"
        )
    return TokenizedExample(input_ids, prompt_len, key_start, key_end)


def featurize_example(
    example: SafeKeyExample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    chat_format: str | ResolvedFormat = AUTO,
) -> dict[str, Any]:
    """Turn one validated example into the trainer's features.

    Returns a dict with `input_ids`, `labels` (-100 on the prompt), `key_mask` (1 on K's tokens), `query_mask` (0 on
    every prompt token, generation prompt included, 1 after), `understanding_span` (`[start, end)` of U's tokens),
    `prefix_end` (the first K token: the head's prefix path pools `[0, prefix_end)`), and `unsafe`. When K does not
    fit in `max_length`, `key_mask` is all zeros and the spans are `[0, 0]`/`0`: the example trains the LM term only.
    The text is rendered in the format of the tokenizer's chat template family, or of the one `chat_format` names
    (see [`render`]).
    """
    tokenized = tokenize_example(example, tokenizer, chat_format)
    input_ids, prompt_len = tokenized.input_ids, tokenized.prompt_len
    key_start, key_end = tokenized.key_start, tokenized.key_end
    if max_length is not None:
        input_ids = input_ids[:max_length]  # right truncation: keep the start
    length = len(input_ids)
    labels = [-100] * min(prompt_len, length) + input_ids[prompt_len:]
    query_mask = [0] * min(prompt_len, length) + [1] * max(length - prompt_len, 0)
    key_fits = not example.lm_only and key_end <= length
    key_mask = [0] * length
    if key_fits:
        key_mask[key_start:key_end] = [1] * (key_end - key_start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "key_mask": key_mask,
        "query_mask": query_mask,
        "understanding_span": [prompt_len, key_start] if key_fits else [0, 0],
        "prefix_end": key_start if key_fits else 0,
        "unsafe": int(example.unsafe),
    }


FEATURE_COLUMNS = ("input_ids", "labels", *SAFEKEY_FEATURES)
# Per-row bookkeeping columns of the `map` in `featurize`, dropped from its output
_STATUS_COLUMNS = ("error_field", "error_message", "has_response", "has_key")


@functools.cache
def _map_features(status_only: bool = False) -> Features:
    """The column types of the `map` in `featurize`, fixed (`input_ids` as int32, as `datasets` infers them) so that
    a batch of error rows, with empty lists, cannot change them."""
    from datasets import Features, List, Value

    status = {
        "error_field": Value("string"),
        "error_message": Value("string"),
        "has_response": Value("bool"),
        "has_key": Value("bool"),
    }
    if status_only:
        return Features(status)
    return Features(
        {
            "input_ids": List(Value("int32")),
            **{name: List(Value("int64")) for name in ("labels", "key_mask", "query_mask", "understanding_span")},
            "prefix_end": Value("int64"),
            "unsafe": Value("int64"),
            **status,
        }
    )


def _example_record(example: SafeKeyExample) -> dict[str, Any]:
    return {
        "prompt_messages": example.prompt_messages,
        "response": example.response,
        "summary_end_idx": example.summary_end_idx,
        "next_sentence_end_idx": example.next_sentence_end_idx,
        "unsafe": example.unsafe,
        "source": example.source,
        "row": example.row,
    }


def _featurize_record(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    chat_format: ResolvedFormat,
    status_only: bool = False,
) -> dict:
    """The `map` function of `featurize`: one example's features, or the error it raised (in the status columns,
    so that the main process raises or counts it in row order, whatever the number of processes). `status_only`:
    the status columns alone (checking data needs no token lists)."""
    example = SafeKeyExample(
        prompt_messages=[{"role": turn["role"], "content": turn["content"]} for turn in record["prompt_messages"]],
        response=record["response"],
        summary_end_idx=record["summary_end_idx"],
        next_sentence_end_idx=record["next_sentence_end_idx"],
        unsafe=record["unsafe"],
        source=record["source"],
        row=record["row"],
    )
    try:
        feature = featurize_example(example, tokenizer, max_length, chat_format)
    except SafeKeyDataError as error:
        empty = {name: [] for name in ("input_ids", "labels", "key_mask", "query_mask", "understanding_span")}
        status = {
            "error_field": error.field_name,
            "error_message": error.message,
            "has_response": False,
            "has_key": False,
        }
        return status if status_only else {**empty, "prefix_end": 0, "unsafe": 0, **status}
    status = {
        "error_field": "",
        "error_message": "",
        "has_response": any(label != -100 for label in feature["labels"]),
        "has_key": any(feature["key_mask"]),
    }
    return status if status_only else {**feature, **status}


def _features_cache_file(
    records: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    chat_format: ResolvedFormat,
    status_only: bool = False,
) -> str:
    """Where the datasets cache keeps the features of these records: keyed by the records, the tokenizer (its
    vocabulary and chat template included), `max_length`, the chat format and the featurising code itself."""
    from datasets import config
    from datasets.fingerprint import Hasher

    code = [_featurize_record, featurize_example, tokenize_example, tokenize_prompt_and_completion, render]
    code.append(render_turn)
    key = Hasher.hash([records._fingerprint, *code, tokenizer, max_length, chat_format, status_only])
    directory = Path(config.HF_DATASETS_CACHE) / "safekey_features"
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory / f"features-{key}.arrow")


def featurize(
    examples: Iterable[SafeKeyExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    skip_invalid: bool = False,
    report: InvalidRowReport | None = None,
    chat_format: str | ResolvedFormat = AUTO,
    num_proc: int | None = None,
    status_only: bool = False,
) -> tuple[Dataset, FeaturizeStats]:
    """Featurize examples into a `datasets.Dataset` ready for [`SafeKeySFTTrainer`].

    Runs [`featurize_example`] on every example through `datasets.map`, on `num_proc` processes, and keeps the
    result in the datasets cache (`HF_DATASETS_CACHE/safekey_features`): the same examples, tokenizer and
    `max_length` are featurised once. Examples whose response does not start within `max_length` have nothing to
    train and are dropped; those whose K is cut train the LM term only, as do LM-only examples. These counts are
    logged and returned. A row whose U or K gets no token of its own under this tokenizer raises
    [`SafeKeyDataError`] (the first such row, in order), or is counted in `report` with `skip_invalid=True`.
    `status_only` counts and checks the same without keeping the features (`data validate`: a large file's token
    lists would take several times its size in the cache); the dataset returned then holds no feature columns.
    """
    from datasets import Dataset

    examples = list(examples)
    stats = FeaturizeStats(rows=len(examples))
    # Once: an unknown template fails before any row
    resolved = chat_format if isinstance(chat_format, ResolvedFormat) else resolve_chat_format(tokenizer, chat_format)
    if not examples:
        return Dataset.from_dict({name: [] for name in FEATURE_COLUMNS}), stats
    records = Dataset.from_list([_example_record(example) for example in examples])
    mapped = records.map(
        _featurize_record,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "chat_format": resolved,
            "status_only": status_only,
        },
        remove_columns=records.column_names,
        features=_map_features(status_only),
        num_proc=num_proc if num_proc and num_proc > 1 and len(examples) > 1 else None,
        cache_file_name=_features_cache_file(records, tokenizer, max_length, resolved, status_only),
        desc="Featurizing",
    )
    status = mapped.select_columns(list(_STATUS_COLUMNS)).to_dict()
    keep = []
    for index, example in enumerate(examples):
        if status["error_field"][index]:
            error = SafeKeyDataError(
                example.source, example.row, status["error_field"][index], status["error_message"][index]
            )
            if not skip_invalid:
                raise error
            if report is not None:
                report.errors.append(error)
            logger.warning("skipped: %s", error)
        elif not status["has_response"][index]:
            stats.dropped_no_response += 1
        else:
            keep.append(index)
            if example.lm_only:
                stats.lm_only += 1
            elif not status["has_key"][index]:
                stats.key_truncated += 1
    stats.examples = len(keep)
    if stats.key_truncated:
        logger.warning(
            "%d of %d examples have their key sentence K cut by max_length=%s: they train the LM term only.",
            stats.key_truncated,
            stats.rows,
            max_length,
        )
    if stats.dropped_no_response:
        logger.warning(
            "%d of %d examples were dropped: their prompt alone fills max_length=%s, leaving no response to train on.",
            stats.dropped_no_response,
            stats.rows,
            max_length,
        )
    dataset = mapped.remove_columns(list(_STATUS_COLUMNS))
    if len(keep) < len(examples):
        dataset = dataset.select(keep)
    return dataset, stats


def load_safekey_dataset(
    path_or_name: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    chat_format: str | ResolvedFormat = AUTO,
    num_proc: int | None = None,
) -> tuple[Dataset, FeaturizeStats, InvalidRowReport]:
    """Load, validate and featurize a SafeKey dataset in one call (`num_proc`: processes featurising)."""
    examples, report = load_examples(path_or_name, split=split, skip_invalid=skip_invalid)
    if not examples:
        raise ValueError(
            f"{path_or_name}: no valid rows to train on" + (f"\n{report.summary()}" if report.count else "")
        )
    dataset, stats = featurize(
        examples,
        tokenizer,
        max_length,
        skip_invalid=skip_invalid,
        report=report,
        chat_format=chat_format,
        num_proc=num_proc,
    )
    if not len(dataset):
        reasons = [f"{stats.dropped_no_response} dropped: the prompt alone fills max_length={max_length}"]
        if report.count:
            reasons.append(f"{report.count} invalid")
        raise ValueError(
            f"{path_or_name}: nothing left to train on: of {stats.rows} valid rows, {'; '.join(reasons)}"
            + (" (raise --max_length)" if stats.dropped_no_response else "")
        )
    return dataset, stats, report
