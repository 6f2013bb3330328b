"""`safekey-trl train --dry-run`: what a recipe will train and roughly how much GPU memory it needs, before any
weight is loaded (the model is built on the meta device from its config)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from trl import ModelConfig

from .config import SafeKeyConfig
from .modeling import lora_targets
from .tiny import build_tiny_tokenizer, is_tiny_model_name, tiny_architecture, tiny_config

# TRL's fused LM head works on float32 tiles of up to 4,096 tokens × 32,768 vocabulary entries
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768
# Activation bytes per token per hidden unit of one transformer layer in 16-bit with flash/sdpa attention
# (Korthikanti et al., 2022: 34·s·b·h per layer, without the attention-score matrix)
LAYER_ACTIVATION_FACTOR = 34
# Share of the sequence the query-masked pass runs over (K ends near 10-15% of real traces)
QMM_SEQUENCE_SHARE = 0.15
GIB = 2**30


@dataclass
class TrainingPlan:
    """Parameter counts and a per-process GPU memory estimate, in bytes."""

    model: str
    total_params: int
    trainable_params: int
    head_params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    lm_head_buffers: float
    notes: list[str]

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.lm_head_buffers

    def render(self) -> str:
        lines = [
            f"model: {self.model}",
            f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable "
            f"({100 * self.trainable_params / max(self.total_params, 1):.2f}%), of which the safety head "
            f"{self.head_params:,}",
            "GPU memory estimate per process (GiB):",
            f"  weights          {self.weights / GIB:8.2f}",
            f"  gradients        {self.gradients / GIB:8.2f}",
            f"  AdamW states     {self.optimizer / GIB:8.2f}",
            f"  activations      {self.activations / GIB:8.2f}",
            f"  LM-head buffers  {self.lm_head_buffers / GIB:8.2f}",
            f"  total            {self.total / GIB:8.2f}",
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _model_config(model_args: ModelConfig, trust_remote_code: bool) -> PretrainedConfig:
    name = model_args.model_name_or_path
    if is_tiny_model_name(name):
        return tiny_config(build_tiny_tokenizer(), tiny_architecture(name))
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ValueError(f"Cannot read the config of {name!r} (offline, or no such model): {error}") from None


def _lora_params(model: nn.Module, model_args: ModelConfig) -> int:
    targets = lora_targets(model_args)
    all_linear = targets == "all-linear"
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        if all_linear or name.split(".")[-1] in targets:
            count += model_args.lora_r * (module.in_features + module.out_features)
    return count


def plan_training(training_args: SafeKeyConfig, model_args: ModelConfig) -> TrainingPlan:
    """Count what a recipe trains and estimate the GPU memory of one process, from the model's config alone."""
    config = _model_config(model_args, training_args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text_config = config.get_text_config()
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    total = sum(parameter.numel() for parameter in model.parameters())
    head = 2 * (hidden + 1)
    dtype_bytes = 4 if model_args.dtype in (None, "float32") else 2
    notes = []
    if model_args.use_peft:
        trainable = _lora_params(model, model_args) + head
        # 4-bit nf4 weights with double quantization: about 4.13 bits a parameter
        weight_bytes = 0.516 if model_args.load_in_4bit else dtype_bytes
        weights = total * weight_bytes
        gradients = trainable * 4
    else:
        trainable = total + head
        weights = total * dtype_bytes
        gradients = trainable * dtype_bytes
        notes.append("under ZeRO-3 or FSDP the weights, gradients and AdamW states divide by the number of GPUs")
    optimizer = trainable * 8  # AdamW: two float32 moments
    tokens = training_args.per_device_train_batch_size * (training_args.max_length or 1024)
    act_bytes = 2 if (training_args.bf16 or training_args.fp16) else 4
    if training_args.gradient_checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed with its full activations
        activations = tokens * hidden * act_bytes * layers + tokens * hidden * LAYER_ACTIVATION_FACTOR
    else:
        activations = tokens * hidden * LAYER_ACTIVATION_FACTOR * layers * act_bytes / 2
    activations *= 1 + QMM_SEQUENCE_SHARE
    # A forward and a backward tile of the fused head
    lm_head_buffers = 2 * 4 * min(tokens, FUSED_TILE_TOKENS) * min(text_config.vocab_size, FUSED_TILE_VOCAB)
    notes.append(
        "activations assume K ends within the first 15% of the sequence; the estimate leaves out the CUDA context "
        "and allocator fragmentation (add 1-3 GiB)"
    )
    return TrainingPlan(
        model=model_args.model_name_or_path,
        total_params=total,
        trainable_params=trainable,
        head_params=head,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        lm_head_buffers=lm_head_buffers,
        notes=notes,
    )
