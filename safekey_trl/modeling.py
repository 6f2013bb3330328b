"""Model loading for a recipe: dtype, attention implementation, 4-bit quantization and LoRA, through TRL's
`ModelConfig`, `get_quantization_config` and `get_peft_config`; `tiny:*` names load the embedded tiny model."""

from __future__ import annotations

import importlib.util

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, get_peft_config, get_quantization_config

from .offline import hub_name
from .tiny import is_tiny_model_name, materialize_tiny

FLASH_ATTENTION = "flash_attention_2"


def resolve_attn_implementation(requested: str | None) -> str:
    """Map a recipe's `attn_implementation` to the one to load with.

    `auto` (or unset) picks flash-attention 2 when `flash_attn` imports and CUDA is present, else `sdpa`. Asking for
    flash-attention where it cannot run is an error now, at start-up, rather than a crash in the first step.
    """
    flash_available = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested in (None, "auto"):
        return FLASH_ATTENTION if flash_available else "sdpa"
    if requested == FLASH_ATTENTION and not flash_available:
        missing = "the `flash_attn` package" if importlib.util.find_spec("flash_attn") is None else "a CUDA device"
        raise ValueError(
            f"attn_implementation={FLASH_ATTENTION!r} needs {missing}. flash-attn builds against the installed "
            "PyTorch, so pip's build isolation breaks it: on a CUDA machine, install the prebuilt flash-attn wheel "
            "that matches your PyTorch, CUDA and Python, or `pip install flash-attn --no-build-isolation` (README, "
            "'flash-attention'). Or use `attn_implementation: sdpa` (or `auto`, which picks sdpa without it)."
        )
    return requested


def load_model_and_tokenizer(
    model_args: ModelConfig, trust_remote_code: bool = False, dequantize_mxfp4: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and tokenizer a recipe names. `tiny:<architecture>` builds the offline tiny model.

    `dequantize_mxfp4` loads a checkpoint stored in MXFP4 (gpt-oss) dequantized to the recipe's dtype, through
    transformers' `Mxfp4Config(dequantize=True)`: the MXFP4 kernels serve inference, not training.
    """
    if not model_args.model_name_or_path:
        raise ValueError("The recipe names no model: set `model_name_or_path`.")
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    name = model_args.model_name_or_path
    if is_tiny_model_name(name):
        # Saved once and loaded like any other model, so that 4-bit loading and adapter export work on it too. The
        # main process writes it first while the others wait (TRL's rule for caches), then they all load it
        from trl.trainer.utils import global_then_local_main_first

        with global_then_local_main_first():
            name = str(materialize_tiny(name))
    quantization_config = get_quantization_config(model_args)
    if dequantize_mxfp4:
        if quantization_config is not None:
            raise ValueError(
                "`dequantize_mxfp4` loads the weights dequantized: it cannot go with `load_in_4bit`/`8bit`."
            )
        from transformers import Mxfp4Config

        quantization_config = Mxfp4Config(dequantize=True)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    with hub_name(name, "model"):  # a Hub name not in the cache, offline: one line saying so
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map=_quantized_device_map() if quantization_config is not None and not dequantize_mxfp4 else None,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
        )
    return model, tokenizer


def apply_tokenizer_settings(tokenizer: PreTrainedTokenizerBase, args, model: PreTrainedModel | None = None) -> list:
    """Apply a config's `eos_token`, `chat_template_path` and `pad_token` to the tokenizer (and the model) now, as
    `SFTTrainer.__init__` would, so that SafeKey featurises with them: TRL applies them only when the trainer is
    built, after SafeKey has rendered and tokenized the data.

    `chat_template_path` is a `.jinja`/`.j2` file, or a tokenizer whose template (and added tokens and EOS) TRL's
    `clone_chat_template` copies, resizing the model's embeddings; without a model only the tokenizer changes (the
    trainer resizes the model when it applies the same setting). Applying them twice changes nothing.

    Returns:
        The tokens a cloned template added (to be made trainable under LoRA, as TRL does).
    """
    import os

    added: list = []
    if args.eos_token is not None:
        _check_in_vocabulary(tokenizer, args.eos_token, "eos_token")
        tokenizer.eos_token = args.eos_token
        if model is not None:
            model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
            eos_ids = model.generation_config.eos_token_id
            eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
            if tokenizer.eos_token_id not in eos_ids:
                model.generation_config.eos_token_id = [tokenizer.eos_token_id, *eos_ids]
    path = args.chat_template_path
    if path is not None:
        if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
            with open(path, encoding="utf-8") as file:
                tokenizer.chat_template = file.read()
        elif model is not None:
            from trl.chat_template_utils import clone_chat_template

            _, _, added = clone_chat_template(model, tokenizer, path)
        else:
            source = AutoTokenizer.from_pretrained(path)
            tokenizer.chat_template = source.get_chat_template()
            tokenizer.add_tokens([t for t in source.added_tokens_decoder.values() if t.content not in tokenizer.vocab])
            tokenizer.eos_token = source.eos_token
    pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is not None:
        _check_in_vocabulary(tokenizer, pad_token, "pad_token")
        tokenizer.pad_token = pad_token
        if model is not None:
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def _check_in_vocabulary(tokenizer: PreTrainedTokenizerBase, token: str, name: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary ({type(tokenizer).__name__}).")


def train_added_tokens(peft_config: LoraConfig | None, added: list) -> None:
    """Make the tokens a cloned chat template added trainable in a LoRA run (TRL's `trainable_token_indices`): the
    trainer would not see them as added, since they are already in the tokenizer when it applies the template."""
    if peft_config is None or not added:
        return
    indices = dict(peft_config.trainable_token_indices or {})
    indices["embed_tokens"] = [*indices.get("embed_tokens", []), *added]
    peft_config.trainable_token_indices = indices


def lora_targets(model_args: ModelConfig) -> str | list[str]:
    """The recipe's LoRA target modules: `"all-linear"` (every linear layer but the LM head) unless it names some."""
    targets = model_args.lora_target_modules
    if isinstance(targets, str):  # a YAML scalar reaches the dataclass unparsed
        targets = [targets]
    return "all-linear" if not targets or list(targets) == ["all-linear"] else list(targets)


def lora_config(model_args: ModelConfig) -> LoraConfig | None:
    """TRL's LoRA config for a recipe (None without `use_peft`), with the targets of [`lora_targets`]."""
    config = get_peft_config(model_args)
    if config is not None:
        config.target_modules = lora_targets(model_args)
    return config


def _quantized_device_map() -> dict[str, int] | None:
    # A quantized model cannot be moved after loading: put it whole on this process's GPU
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}
