"""SafeKey data: how a row becomes the trainer's features.

One part a module, in the order a row goes through them:

- `rows`: the row schema (`SafeKeyExample`), its validation and `SafeKeyDataError`, which names the file, the row
  and the field of a bad row.
- `reading`: rows from `.jsonl`/`.json`/`.parquet` files or a Hub dataset (`read_rows`, `load_examples`).
- `mixture`: several datasets in TRL's mixture form, with fractions, column maps and LM-only rows.
- `chat_formats`: each model family's reasoning turn (a subpackage: the family table, recognising a template by what
  it renders, rendering and mapping offsets).
- `featurize`: rendering and tokenizing an example, placing U and K on tokens (`key_mask`, `query_mask`,
  `understanding_span`, `prefix_end`), and `featurize` over a whole dataset.
- `convert`, `annotate`, `stats`: `safekey-trl data convert`, `data annotate` and `data stats`.

None of them imports `datasets` or `transformers` at import time (only the functions that use them do), so that the
command line starts at once.
"""

from .featurize import (
    FEATURE_COLUMNS,
    SAFEKEY_FEATURES,
    FeaturizeStats,
    RenderedExample,
    TokenizedExample,
    featurize,
    featurize_example,
    load_safekey_dataset,
    render,
    token_spans,
    tokenize_example,
)
from .reading import LOCAL_SUFFIXES, load_examples, read_rows
from .rows import (
    BENIGN_SOURCE,
    CLOSE_TAG,
    OPEN_TAG,
    THINK_CLOSE,
    THINK_OPEN,
    InvalidRowReport,
    SafeKeyDataError,
    SafeKeyExample,
    validate_lm_only_row,
    validate_row,
)

__all__ = [
    "BENIGN_SOURCE",
    "CLOSE_TAG",
    "FEATURE_COLUMNS",
    "LOCAL_SUFFIXES",
    "OPEN_TAG",
    "SAFEKEY_FEATURES",
    "THINK_CLOSE",
    "THINK_OPEN",
    "FeaturizeStats",
    "InvalidRowReport",
    "RenderedExample",
    "SafeKeyDataError",
    "SafeKeyExample",
    "TokenizedExample",
    "featurize",
    "featurize_example",
    "load_examples",
    "load_safekey_dataset",
    "read_rows",
    "render",
    "token_spans",
    "tokenize_example",
    "validate_lm_only_row",
    "validate_row",
]
