"""Helpers shared by the trainer and loss tests."""

from __future__ import annotations

from safekey_trl import SafeKeyConfig, SafeKeySFTTrainer


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
