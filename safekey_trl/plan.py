"""`safekey-trl train --dry-run`: what a recipe will train, roughly how much GPU memory it needs, and what SafeKey's
terms (and the reference's way of computing them) add to a plain SFT step, before any weight is loaded (the model is
built on the meta device from its config). It runs on a machine without a GPU.

The cost model counts multiply-adds (MACs) of a decoder-only transformer per token: the linear layers (attention
projections and the gated MLP), causal attention (scores and weighted sum, which grow with the position), and the LM
head. A training step is a forward pass, the input gradients (as much again) and, for trained weights, the weight
gradients (as much again); gradient checkpointing runs the layers' forward once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from trl import ModelConfig

from .config import SafeKeyConfig
from .modeling import lora_targets
from .offline import is_offline
from .tiny import is_tiny_model_name, tiny_architecture, tiny_config, tiny_tokenizer

# TRL's fused LM head works on float32 tiles of up to 4,096 tokens × 32,768 vocabulary entries
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768
# Activation bytes per token per hidden unit of one transformer layer in 16-bit with flash/sdpa attention
# (Korthikanti et al., 2022: 34·s·b·h per layer, without the attention-score matrix)
LAYER_ACTIVATION_FACTOR = 34
# Where K ends, as a share of the sequence: the query-masked pass runs up to there. An assumption: K (the sentence
# after the understanding summary) ends within the first 10-15% of real reasoning traces; the benchmark puts it at
# 12.5%.
QMM_SEQUENCE_SHARE = 0.15
# K is one sentence: its tokens are the only positions the query-masked pass projects through the LM head
KEY_TOKENS = 32
# Bytes a full-logits loss holds per logit: 16-bit logits, their float32 copy for the loss and its float32 gradient
# (on a CPU in float32, `docs/benchmarks.md` measures about three float32 copies: 12 bytes)
FULL_LOGIT_BYTES = 10
# Bytes per K logit in the query-masked pass: float32 logits and their gradient
KEY_LOGIT_BYTES = 8
GIB = 2**30

# The paper's models, so that `--dry-run` works offline (a laptop or a login node without the Hub cache): the
# shape fields of their `config.json`
KNOWN_CONFIGS: dict[str, tuple[str, dict[str, int | bool | list[str]]]] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": (
        "qwen2",
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=48,
            num_attention_heads=40,
            num_key_value_heads=8,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen/Qwen3-8B": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer with grouped-query attention and a gated (SwiGLU) MLP."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        text = config.get_text_config()
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            vocab=text.vocab_size,
            head_dim=getattr(text, "head_dim", None),
        )

    @property
    def attention_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def linear_macs_per_token(self) -> int:
        """Every layer's projections: q and o (hidden × attention width), k and v (hidden × KV width), and the MLP's
        gate, up and down (3 × hidden × intermediate)."""
        kv_width = self.kv_heads * (self.head_dim or self.hidden // self.heads)
        per_layer = 2 * self.hidden * self.attention_width + 2 * self.hidden * kv_width
        per_layer += 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    def attention_macs(self, length: int) -> int:
        """Causal attention over a `length`-token sequence, every layer: position t attends to t + 1 positions, in
        the scores (q·k) and the weighted sum (p·v)."""
        return self.layers * 2 * self.attention_width * length * (length + 1) // 2

    def head_macs_per_token(self) -> int:
        """The LM head: hidden × vocabulary per projected position."""
        return self.hidden * self.vocab

    def forward_macs(self, length: int, projected: int | None = None) -> int:
        """One forward over `length` tokens, `projected` of them (all by default) through the LM head."""
        projected = length if projected is None else projected
        return (
            length * self.linear_macs_per_token()
            + self.attention_macs(length)
            + projected * self.head_macs_per_token()
        )

    def head_share(self, length: int) -> float:
        """The LM head's share of a forward's multiply-adds over `length` tokens."""
        return length * self.head_macs_per_token() / self.forward_macs(length)


def training_step_macs(
    shape: ModelShape,
    length: int,
    projected: int | None = None,
    train_weights: bool = True,
    train_head: bool = True,
    recompute: bool = False,
) -> int:
    """Multiply-adds of a forward and backward over `length` tokens (`projected` through the LM head).

    Backward: the input gradients cost a forward again, and the weight gradients of trained weights once more;
    attention has no weights, its backward costs two forwards. `recompute` (gradient checkpointing) runs the layers'
    forward a second time (not the LM head, which comes after the last checkpoint).
    """
    projected = length if projected is None else projected
    linear = length * shape.linear_macs_per_token()
    attention = shape.attention_macs(length)
    head = projected * shape.head_macs_per_token()
    layer_passes = 2 + (1 if train_weights else 0) + (1 if recompute else 0)
    attention_passes = 3 + (1 if recompute else 0)
    head_passes = 2 + (1 if train_head else 0)
    return linear * layer_passes + attention * attention_passes + head * head_passes


@dataclass
class StepCosts:
    """Compute (multiply-adds) and memory (bytes) of one micro-batch step per process: plain SFT, and what SafeKey
    and the reference's way of computing the same loss add to it."""

    tokens: int
    key_end: int
    key_tokens: int
    plain_macs: float
    safekey_extra_macs: float
    reference_extra_macs: float
    plain_memory: float
    safekey_extra_memory: float
    reference_extra_memory: float

    def render(self) -> list[str]:
        def row(name: str, macs: float, memory: float, base_macs: float, base_memory: float) -> str:
            return (
                f"  {name:<26}{'+' if base_macs else ' '}{2 * macs / 1e12:9.1f}"
                + (f" ({100 * macs / base_macs:+.1f}%)" if base_macs else " " * 10)
                + f"   {'+' if base_memory else ' '}{memory / GIB:7.2f}"
                + (f" ({100 * memory / base_memory:+.1f}%)" if base_memory else "")
            )

        return [
            f"cost of one step over {self.tokens:,} tokens per process (TFLOP = 2 x multiply-adds; memory in GiB):",
            f"  {'':<26}{'TFLOP':>10}{'':10}   {'GiB':>8}",
            row("plain SFT (TRL)", self.plain_macs, self.plain_memory, 0, 0),
            row(
                "SafeKey adds", self.safekey_extra_macs, self.safekey_extra_memory, self.plain_macs, self.plain_memory
            ),
            row(
                "the reference's way adds",
                self.reference_extra_macs,
                self.reference_extra_memory,
                self.plain_macs,
                self.plain_memory,
            ),
            f"  SafeKey: the query-masked pass over the first {self.key_end:,} tokens of each sequence (K assumed to "
            f"end at {QMM_SEQUENCE_SHARE:.0%} of it), {self.key_tokens} K tokens through the head, the safety head.",
            "  The reference's way: a second full-length forward with full logits, and full logits (not the fused "
            f"head) in both passes ({FULL_LOGIT_BYTES} bytes a logit); its `output_hidden_states` keeps only what the "
            "backward keeps anyway.",
        ]


@dataclass
class TrainingPlan:
    """Parameter counts, a per-process GPU memory estimate in bytes, and the step costs of SafeKey's terms."""

    model: str
    total_params: int
    trainable_params: int
    head_params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    query_masked_pass: float
    lm_head_buffers: float
    costs: StepCosts
    notes: list[str]

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.query_masked_pass
            + self.lm_head_buffers
        )

    def render(self) -> str:
        lines = [
            f"model: {self.model}",
            f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable "
            f"({100 * self.trainable_params / max(self.total_params, 1):.2f}%), of which the safety head "
            f"{self.head_params:,}",
            "GPU memory estimate per process (GiB):",
            f"  weights            {self.weights / GIB:8.2f}",
            f"  gradients          {self.gradients / GIB:8.2f}",
            f"  AdamW states       {self.optimizer / GIB:8.2f}",
            f"  activations        {self.activations / GIB:8.2f}",
            f"  query-masked pass  {self.query_masked_pass / GIB:8.2f}",
            f"  LM-head buffers    {self.lm_head_buffers / GIB:8.2f}",
            f"  total              {self.total / GIB:8.2f}",
            *self.costs.render(),
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# How long the dry run waits for the Hub to answer before planning offline
HUB_PROBE_TIMEOUT = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hub answers at all: no at once under `HF_HUB_OFFLINE`, else one request to the endpoint with a
    short timeout and no retries (any HTTP answer counts), so that a machine without network plans from the cache or
    a built-in shape at once instead of waiting through the Hub client's retries."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if is_offline():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # no route, refused, reset, timed out, a malformed endpoint
        return False
    return True


def _model_config(model_args: ModelConfig, trust_remote_code: bool, notes: list[str]) -> PretrainedConfig:
    name = model_args.model_name_or_path
    if is_tiny_model_name(name):
        return tiny_config(tiny_tokenizer(tiny_architecture(name)), tiny_architecture(name))
    online = Path(name).is_dir() or hub_reachable()
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=trust_remote_code, local_files_only=not online
        )
    except OSError as error:
        why = "offline?" if online else "offline: the Hub did not answer, and it is not in the cache"
        if name in KNOWN_CONFIGS:
            model_type, fields = KNOWN_CONFIGS[name]
            notes.append(f"{name}'s config could not be read ({why}): planned with its built-in shape")
            return AutoConfig.for_model(model_type, **fields)
        raise ValueError(f"Cannot read the config of {name!r} ({why}, or no such model): {error}") from None


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


def _activation_bytes(tokens: int, hidden: int, layers: int, act_bytes: int, checkpointing: bool) -> float:
    if checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed with its full activations
        return tokens * hidden * act_bytes * layers + tokens * hidden * LAYER_ACTIVATION_FACTOR
    return tokens * hidden * LAYER_ACTIVATION_FACTOR * layers * act_bytes / 2


def plan_training(training_args: SafeKeyConfig, model_args: ModelConfig) -> TrainingPlan:
    """Count what a recipe trains and estimate the GPU memory of one process and the cost of SafeKey's terms, from
    the model's config alone."""
    notes: list[str] = []
    config = _model_config(model_args, training_args.trust_remote_code, notes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(config)
    hidden, layers = shape.hidden, shape.layers
    total = sum(parameter.numel() for parameter in model.parameters())
    head = 2 * (hidden + 1)
    dtype_bytes = 4 if model_args.dtype in (None, "float32") else 2
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
    weights += head * 4  # the safety head, in float32
    batch = training_args.per_device_train_batch_size
    length = training_args.max_length or 1024
    tokens = batch * length
    act_bytes = 2 if (training_args.bf16 or training_args.fp16) else 4
    checkpointing = bool(training_args.gradient_checkpointing)
    activations = _activation_bytes(tokens, hidden, layers, act_bytes, checkpointing)
    # A forward and a backward tile of the fused head
    lm_head_buffers = 2 * 4 * min(tokens, FUSED_TILE_TOKENS) * min(shape.vocab, FUSED_TILE_VOCAB)

    key_end = max(1, round(QMM_SEQUENCE_SHARE * length))
    key_tokens = min(KEY_TOKENS, key_end)
    train_weights = not model_args.use_peft  # LoRA's own weights are a rounding error next to the frozen ones
    step = dict(train_weights=train_weights, train_head=train_weights, recompute=checkpointing)
    plain_macs = batch * training_step_macs(shape, length, **step)
    # The query-masked pass: the layers up to K's end, K's tokens through the LM head; the safety head pools the
    # hidden states up to K (one multiply-add per hidden unit per token, forward and backward) and projects twice
    safekey_macs = batch * (training_step_macs(shape, key_end, projected=key_tokens, **step) + 2 * key_end * hidden)
    query_masked_pass = _activation_bytes(batch * key_end, hidden, layers, act_bytes, checkpointing)
    query_masked_pass += batch * key_tokens * shape.vocab * KEY_LOGIT_BYTES
    # The safety head's float32 weights, its gradients (counted at the trainable parameters' width) and AdamW moments
    head_state = head * (4 + gradients / trainable + 8)
    full_logits = tokens * shape.vocab * FULL_LOGIT_BYTES
    reference_macs = batch * training_step_macs(shape, length, **step)
    # Both passes' full logits instead of the fused head's tiles, and the second pass's activations
    reference_memory = 2 * full_logits - lm_head_buffers + activations + head_state
    plain_memory = weights + gradients + optimizer - head_state + activations + lm_head_buffers
    costs = StepCosts(
        tokens=tokens,
        key_end=key_end,
        key_tokens=key_tokens,
        plain_macs=plain_macs,
        safekey_extra_macs=safekey_macs,
        reference_extra_macs=reference_macs,
        plain_memory=plain_memory,
        safekey_extra_memory=query_masked_pass + head_state,
        reference_extra_memory=reference_memory,
    )
    notes.append(
        f"the estimate leaves out the CUDA context and allocator fragmentation (add 1-3 GiB); K is assumed to end at "
        f"{QMM_SEQUENCE_SHARE:.0%} of max_length with {KEY_TOKENS} K tokens (a later K costs proportionally more)"
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
        query_masked_pass=query_masked_pass,
        lm_head_buffers=lm_head_buffers,
        costs=costs,
        notes=notes,
    )


def plan_recipe(recipe: str, overrides: list[str] | None = None) -> TrainingPlan:
    """Plan a recipe on any machine: parsed for planning only, with `use_cpu` set so that transformers' check that
    bf16 has a GPU to run on (which a real run keeps) does not stop a laptop or a login node."""
    from .sft import parse_recipe

    _, training_args, model_args = parse_recipe(recipe, [*(overrides or []), "--use_cpu", "true"])
    return plan_training(training_args, model_args)
