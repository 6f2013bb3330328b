"""Train from a recipe: load the model and data, run `SafeKeySFTTrainer`, save the clean model and its head.

The thin script behind `safekey-trl train` and `make train`, in the manner of open-r1's `sft.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, TrlParser

from .config import SafeKeyConfig, SafeKeyScriptArguments
from .data import load_safekey_dataset
from .modeling import load_model_and_tokenizer, lora_config
from .trainer import SafeKeySFTTrainer

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(recipe: str) -> Path:
    """A recipe path, or a name looked up as `recipes/<name>.yaml` (in the current directory, then the checkout)."""
    candidates = [Path(recipe), Path("recipes") / f"{recipe}.yaml", RECIPES_DIR / f"{recipe}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise FileNotFoundError(f"No recipe {recipe!r}: not a file, and not one of {available}.")


def parse_recipe(
    recipe: str, overrides: list[str] | None = None
) -> tuple[SafeKeyScriptArguments, SafeKeyConfig, ModelConfig]:
    """Parse a recipe YAML into the three config dataclasses; `overrides` are `--field value` pairs that win."""
    parser = TrlParser((SafeKeyScriptArguments, SafeKeyConfig, ModelConfig))
    return parser.parse_args_and_config(args=["--config", str(resolve_recipe(recipe)), *(overrides or [])])


def train(
    script_args: SafeKeyScriptArguments, training_args: SafeKeyConfig, model_args: ModelConfig
) -> SafeKeySFTTrainer:
    """Run a SafeKey training and save the final model; returns the trainer."""
    set_seed(training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, trust_remote_code=training_args.trust_remote_code)

    def load(name: str, split: str):
        dataset, stats, report = load_safekey_dataset(
            name, tokenizer, training_args.max_length, split=split, skip_invalid=script_args.skip_invalid
        )
        logger.info(
            "%s: %d examples (%d with K cut by max_length, %d dropped, %d invalid skipped)",
            name,
            stats.examples,
            stats.key_truncated,
            stats.dropped_no_response,
            report.count,
        )
        return dataset

    train_dataset = load(script_args.dataset_name, script_args.dataset_train_split)
    eval_dataset = load(script_args.eval_dataset_name, "test") if script_args.eval_dataset_name else None
    trainer = SafeKeySFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    logger.info("Saved the model to %s and its safety head beside it.", training_args.output_dir)
    return trainer
