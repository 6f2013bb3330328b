"""Helpers shared by the tests: a CPU training config and trainer, the boundary-rule check."""

from __future__ import annotations

from typing import Any

from conftest import make_example

from safekey_trl import SafeKeyConfig, SafeKeySFTTrainer
from safekey_trl.data import SafeKeyDataError, featurize_example, render


def make_config(output_dir, **overrides) -> SafeKeyConfig:
    """A float32 CPU config for the tiny model: batch 4, the auxiliary terms on from the first epoch, nothing saved."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        auxiliary_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; exact float32 on CPU
        seed=7,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SafeKeyConfig(**settings)


def make_trainer(output_dir, model, tokenizer, examples, **overrides) -> SafeKeySFTTrainer:
    return SafeKeySFTTrainer(
        model, make_config(output_dir, **overrides), train_dataset=examples, processing_class=tokenizer
    )


def first_batch(trainer: SafeKeySFTTrainer, size: int = 4) -> dict:
    """The collated first `size` training rows, as `compute_loss` receives them."""
    rows = [trainer.train_dataset[i] for i in range(size)]
    return trainer.data_collator(rows)


def check_boundary_rule(tokenizer, understanding: str, key: str, rest: str) -> tuple[Any, list, dict] | None:
    """Featurize a U/K/rest example and assert the boundary rule on it: K's tokens are exactly those whose first
    character lies in K, and they decode to K's text minus at most the head of a token that starts in U, plus at most
    the tail of K's last token. Returns `(rendered, offsets, feature)`, or None when no token starts inside K (then
    featurizing must refuse the row, naming `next_sentence_end_idx`)."""
    example = make_example(understanding=understanding, key=key, rest=rest)
    rendered = render(example, tokenizer)
    a, b = rendered.understanding_end, rendered.key_end
    assert rendered.text[a:b] == key
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    try:
        feature = featurize_example(example, tokenizer)
    except SafeKeyDataError as error:
        # Only when no token starts inside K: all of K shares a token with U
        assert error.field_name == "next_sentence_end_idx"
        assert not any(a <= start < b for start, _ in offsets)
        return None
    key_start = feature["prefix_end"]
    key_end = key_start + sum(feature["key_mask"])
    for index, (start, _) in enumerate(offsets):
        assert (a <= start < b) == (key_start <= index < key_end)
    first, last = offsets[key_start], offsets[key_end - 1]
    assert tokenizer.decode(feature["input_ids"][key_start:key_end]) == rendered.text[first[0] : last[1]]
    # What K's tokens miss at the start lies inside the token before them, which starts in U
    assert first[0] == a or offsets[key_start - 1][0] < a < offsets[key_start - 1][1]
    assert rendered.text[a:b].endswith(rendered.text[first[0] : b])
    assert last[1] >= b
    return rendered, offsets, feature
