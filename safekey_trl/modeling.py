"""Model loading for a recipe: dtype, attention implementation, 4-bit quantization and PEFT, through TRL's
`ModelConfig`, `get_quantization_config` and `get_peft_config`; and the embedded tiny model for `tiny:*` names."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, get_quantization_config

from .tiny import is_tiny_model_name, load_tiny

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
            f"attn_implementation={FLASH_ATTENTION!r} needs {missing}. Install it with "
            "`pip install 'safekey-trl[flash]'` on a CUDA machine, or use `attn_implementation: sdpa` (or `auto`)."
        )
    return requested


def load_model_and_tokenizer(
    model_args: ModelConfig, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and tokenizer a recipe names. `tiny:qwen2` / `tiny:llama` build the offline tiny model."""
    if not model_args.model_name_or_path:
        raise ValueError("The recipe names no model: set `model_name_or_path`.")
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    if is_tiny_model_name(model_args.model_name_or_path):
        return load_tiny(model_args.model_name_or_path, attn_implementation=attn_implementation)
    quantization_config = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        dtype=dtype,
        quantization_config=quantization_config,
        device_map=_quantized_device_map() if quantization_config is not None else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
    )
    return model, tokenizer


def _quantized_device_map() -> dict[str, int] | None:
    # A quantized model cannot be moved after loading: put it whole on this process's GPU
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}
