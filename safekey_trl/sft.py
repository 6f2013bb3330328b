"""Train from a recipe: load the model and data, run `SafeKeySFTTrainer`, save the clean model and its head.

The thin script behind `safekey-trl train` and `make train`, in the manner of open-r1's `sft.py`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, TrlParser
from trl.trainer.utils import global_then_local_main_first

from .config import SafeKeyConfig, SafeKeyScriptArguments
from .data import FeaturizeStats, featurize, load_safekey_dataset
from .data.chat_formats import resolve_chat_format
from .data.mixture import dataset_label, load_mixture
from .export import check_safetensors_files
from .modeling import apply_tokenizer_settings, load_model_and_tokenizer, lora_config, train_added_tokens
from .resources import accelerate_configs_dir, recipes_dir, resolve_dataset_path
from .resume import check_checkpoint_complete, resolve_resume_from_checkpoint
from .run_lock import output_dir_guard
from .tracking import check_trackers_installed
from .trainer import SafeKeySFTTrainer

logger = logging.getLogger(__name__)


def resolve_recipe(recipe: str) -> Path:
    """A recipe path, or a name looked up as `recipes/<name>.yaml` in the current directory, then among the shipped
    recipes (`safekey-trl recipes` lists them)."""
    shipped = recipes_dir()
    candidates = [Path(recipe), Path("recipes") / f"{recipe}.yaml", shipped / f"{recipe}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(path.stem for path in shipped.glob("*.yaml"))
    raise FileNotFoundError(f"No recipe {recipe!r}: not a file, and not one of {available}.")


def accelerate_launch_command(
    accelerate_config: str,
    recipe: str,
    overrides: list[str],
    num_processes: int | None = None,
    num_machines: int | None = None,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
) -> list[str]:
    """The `accelerate launch` command that runs `safekey-trl train` under an accelerate config.

    `accelerate_config` is a file, or the name of a shipped config (ddp, zero2, zero3, zero3_offload, fsdp).
    The launch flags given here override the config's; multi-node runs pass the same command on every node with its
    own `machine_rank`.
    """
    shipped = accelerate_configs_dir()
    candidates = [Path(accelerate_config), shipped / f"{accelerate_config}.yaml"]
    config = next((candidate for candidate in candidates if candidate.is_file()), None)
    if config is None:
        available = sorted(path.stem for path in shipped.glob("*.yaml"))
        raise FileNotFoundError(f"No accelerate config {accelerate_config!r}: not a file, and not one of {available}.")
    executable = Path(sys.executable).parent / "accelerate"
    command = [str(executable) if executable.is_file() else "accelerate", "launch", "--config_file", str(config)]
    flags = {
        # The recipe decides the precision; the config's `mixed_precision` would otherwise override it
        "--mixed_precision": recipe_mixed_precision(recipe, overrides),
        "--num_processes": num_processes,
        "--num_machines": num_machines,
        "--machine_rank": machine_rank,
        "--main_process_ip": main_process_ip,
        "--main_process_port": main_process_port,
    }
    for flag, value in flags.items():
        if value is not None:
            command += [flag, str(value)]
    return [*command, "-m", "safekey_trl", "train", "--recipe", recipe, *overrides]


def recipe_mixed_precision(recipe: str, overrides: list[str]) -> str:
    """`bf16`, `fp16` or `no`, as the recipe and its command-line overrides set `bf16`/`fp16` (TRL's default: bf16)."""
    import yaml

    path = resolve_recipe(recipe)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise recipe_syntax_error(path, error) from None
    for index, argument in enumerate(overrides):
        name, _, inline = argument.lstrip("-").partition("=")
        if name in ("bf16", "fp16"):
            following = overrides[index + 1] if index + 1 < len(overrides) else ""
            value = inline or (following if not following.startswith("--") else "true")
            values[name] = value.lower() in ("true", "1", "yes")
    fp16 = bool(values.get("fp16", False))
    bf16 = values.get("bf16")
    bf16 = (not fp16) if bf16 is None else bool(bf16)
    return "fp16" if fp16 else "bf16" if bf16 else "no"


def recipe_syntax_error(path: Path, error: Exception) -> ValueError:
    """One line for a recipe that is not valid YAML: the file, the line and column, and what is wrong there."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return ValueError(f"{path}: not valid YAML: {where}{problem}")


def parse_recipe(
    recipe: str, overrides: list[str] | None = None
) -> tuple[SafeKeyScriptArguments, SafeKeyConfig, ModelConfig]:
    """Parse a recipe YAML into the three config dataclasses; `overrides` are `--field value` pairs that win."""
    import yaml

    parser = TrlParser((SafeKeyScriptArguments, SafeKeyConfig, ModelConfig))
    path = resolve_recipe(recipe)
    try:
        return parser.parse_args_and_config(args=["--config", str(path), *(overrides or [])])
    except yaml.YAMLError as error:
        raise recipe_syntax_error(path, error) from None


def resume_checkpoint(training_args: SafeKeyConfig) -> Path | None:
    """The checkpoint directory `resume_from_checkpoint` names: a path, or `true`/`auto` for the last one in
    output_dir (none yet: None, a fresh start)."""
    resume = resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is None:
        return None
    check_checkpoint_complete(resume)
    return Path(resume)


def recipe_chat_format(script_args: SafeKeyScriptArguments, tokenizer):
    """The family a recipe renders its examples in: `chat_format`, `chat_format_turn`, `chat_template_kwargs`."""
    return resolve_chat_format(
        tokenizer, script_args.chat_format, script_args.chat_format_turn, script_args.chat_template_kwargs
    )


def check_recipe_data(script_args: SafeKeyScriptArguments) -> None:
    """A recipe names its data, as TRL's `sft` script requires: there is no default dataset."""
    if not script_args.datasets and not script_args.dataset_name:
        raise ValueError(
            "The recipe names no data: set `dataset_name` (a SafeKey-format file or a Hub dataset) or a `datasets` "
            "mixture (a misspelt key is not read)."
        )


def load_mixture_dataset(script_args: SafeKeyScriptArguments, tokenizer, training_args: SafeKeyConfig, log_counts):
    """Featurise a recipe's data mixture; with `test_split_size`, also hold out an evaluation set from it."""
    examples, report = load_mixture(script_args.datasets, skip_invalid=script_args.skip_invalid)
    dataset, stats = featurize(
        examples,
        tokenizer,
        training_args.max_length,
        skip_invalid=script_args.skip_invalid,
        report=report.invalid,
        chat_format=recipe_chat_format(script_args, tokenizer),
        num_proc=training_args.dataset_num_proc,
    )
    log_counts("mixture", stats, report.invalid.count)
    if script_args.test_split_size is None:
        return dataset, None
    split = dataset.train_test_split(test_size=script_args.test_split_size, seed=training_args.seed)
    return split["train"], split["test"]


def train(
    script_args: SafeKeyScriptArguments, training_args: SafeKeyConfig, model_args: ModelConfig
) -> SafeKeySFTTrainer:
    """Run a SafeKey training, save the final model and end the run (trackers finished, the process group
    destroyed); returns the trainer.

    Before anything loads: the trackers and the data are there, the checkpoint to resume is whole, and `output_dir`
    can be written and is held for this run (see `run_lock`: a live run there, or a finished one not resumed, is
    refused)."""
    # A tracker the recipe asks for, and data, must be there before minutes go into loading a model
    check_trackers_installed(training_args.report_to)
    check_recipe_data(script_args)
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir}: exists and is not a directory")
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is not None:
        check_safetensors_files(checkpoint)
    with output_dir_guard(output_dir, checkpoint is not None, training_args.overwrite_output_dir):
        trainer = _train(script_args, training_args, model_args, checkpoint)
    # Finish the trackers and destroy the process group: nothing after this may need the other processes
    trainer.end()
    return trainer


def _train(
    script_args: SafeKeyScriptArguments,
    training_args: SafeKeyConfig,
    model_args: ModelConfig,
    checkpoint: Path | None,
) -> SafeKeySFTTrainer:
    if not training_args.should_log:
        # The main process logs at INFO; the others at `log_level_replica` (warning), as TRL's scripts do
        logging.getLogger("safekey_trl").setLevel(training_args.get_process_log_level())
    set_seed(training_args.seed)
    model, tokenizer = load_model_and_tokenizer(
        model_args, trust_remote_code=training_args.trust_remote_code, dequantize_mxfp4=script_args.dequantize_mxfp4
    )
    # The recipe's chat template, EOS and pad tokens, before the data is rendered with them (TRL applies them later)
    added_tokens = apply_tokenizer_settings(tokenizer, training_args, model)

    def log_counts(name: str, stats: FeaturizeStats, invalid: int) -> None:
        logger.info(
            "%s: %d examples (%d LM-only, %d with K cut by max_length, %d dropped, %d invalid skipped)",
            name,
            stats.examples,
            stats.lm_only,
            stats.key_truncated,
            stats.dropped_no_response,
            invalid,
        )

    def load(name: str, split: str):
        name = resolve_dataset_path(name)
        dataset, stats, report = load_safekey_dataset(
            name,
            tokenizer,
            training_args.max_length,
            split=split,
            skip_invalid=script_args.skip_invalid,
            chat_format=recipe_chat_format(script_args, tokenizer),
            num_proc=training_args.dataset_num_proc,
        )
        log_counts(name, stats, report.count)
        return dataset

    # Featurised once: the main process fills the datasets cache, then the others read it (TRL's rule)
    with global_then_local_main_first():
        if script_args.datasets:
            train_dataset, eval_dataset = load_mixture_dataset(script_args, tokenizer, training_args, log_counts)
        else:
            train_dataset = load(script_args.dataset_name, script_args.dataset_train_split)
            eval_dataset = None
        if script_args.eval_dataset_name:
            eval_dataset = load(script_args.eval_dataset_name, "test")
    peft_config = lora_config(model_args)
    train_added_tokens(peft_config, added_tokens)
    trainer = SafeKeySFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if script_args.datasets:
        trainer.dataset_names = [dataset_label(config) for config in script_args.datasets]
    else:
        trainer.dataset_names = [script_args.dataset_name]
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    if trainer.is_fsdp_enabled:
        # Gather the shards for the final save, so the exported model is plain safetensors
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_run(training_args.output_dir)  # the model, its head and the model card, written aside and moved in
    if trainer.accelerator.is_main_process:
        logger.info("Saved the model to %s, its safety head and model card beside it.", training_args.output_dir)
    if training_args.push_to_hub:
        # The clean model (or adapter), the head file, the tokenizer and SafeKey's card; not the checkpoints
        trainer.push_to_hub()
        if trainer.accelerator.is_main_process:
            logger.info("Pushed to the Hub: %s", trainer.hub_model_id)
    return trainer
