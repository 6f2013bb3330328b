"""An embedded tiny model for offline runs: the default recipe and the tests.

No weights can be downloaded on CI, so `tiny:qwen2` / `tiny:llama` build a randomly initialised 2-layer model and
a byte-level BPE tokenizer trained in memory. The tokenizer carries the DeepSeek-R1-Distill special tokens and the
real R1-Distill chat template (shipped in `safekey_trl/templates/`), so spans, masks and rendering are exercised
exactly as on the real models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase, Qwen2Config

TINY_PREFIX = "tiny:"
# Each tiny architecture, with the model family whose tokenizer (special tokens and chat template) it gets
TINY_ARCHITECTURES = {
    "qwen2": "r1_distill",
    "llama": "r1_distill",
    "qwen3": "qwen3",
    "gpt_oss": "gpt_oss",
    "glm4_moe": "glm4_moe",
    "nemotron_h": "nemotron_3",
    "gemma4_text": "gemma4",
}

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
# The R1-Distill special tokens the chat template emits (tool tokens included, so every template branch tokenizes).
SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
# In the R1-Distill tokenizers these are added tokens but not special ones: they survive `skip_special_tokens`.
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE_FILE = "deepseek_r1_distill_chat_template.jinja"


@dataclass(frozen=True)
class FamilyTokens:
    """A model family's special tokens, as its tokenizer holds them: `bos`/`eos`/`pad` and the other special tokens
    its chat template emits, and `added` tokens that are not special (they survive `skip_special_tokens`)."""

    bos: str | None
    eos: str
    pad: str
    special: tuple[str, ...]
    added: tuple[str, ...] = ()


_TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
FAMILY_TOKENS: dict[str, FamilyTokens] = {
    "r1_distill": FamilyTokens(BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, tuple(SPECIAL_TOKENS[3:]), tuple(THINK_TOKENS)),
    "qwen3": FamilyTokens(
        None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",), ("<think>", "</think>", *_TOOL_TAGS)
    ),
    "gpt_oss": FamilyTokens(
        "<|startoftext|>",
        "<|return|>",
        "<|endoftext|>",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>"),
    ),
    "nemotron_3": FamilyTokens("<s>", "<|im_end|>", "</s>", ("<|im_start|>",), ("<think>", "</think>", *_TOOL_TAGS)),
    "glm4_moe": FamilyTokens(
        None,
        "<|endoftext|>",
        "<|endoftext|>",
        ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        ("<think>", "</think>", *_TOOL_TAGS, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    ),
    "gemma4": FamilyTokens(
        "<bos>",
        "<eos>",
        "<pad>",
        ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>"),
        ("<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", '<|"|>'),
    ),
}
FAMILY_TOKENS["deepseek_v3"] = FAMILY_TOKENS["r1_distill"]
FAMILY_TOKENS["phi4_reasoning"] = FamilyTokens(
    "<|endoftext|>", "<|im_end|>", "<|dummy_85|>", ("<|im_start|>", "<|im_sep|>"), ("<think>", "</think>")
)
FAMILY_TOKENS["olmo3_think"] = FamilyTokens(
    None, "<|im_end|>", "<|pad|>", ("<|im_start|>", "<|endoftext|>"), ("<think>", "</think>")
)
# Qwen2's pre-tokenizer split (Llama 3's but for digits): unlike GPT-2's, it keeps a run of newlines in one piece,
# so that `\n\n` is a single token, as in the R1-Distill, Qwen and Llama 3 tokenizers
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def r1_distill_chat_template() -> str:
    """The DeepSeek-R1-Distill chat template, as the models ship it in `tokenizer_config.json`."""
    return resources.files("safekey_trl").joinpath("templates", CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def is_tiny_model_name(name: str | None) -> bool:
    """Whether `name` asks for the embedded tiny model (`tiny:qwen2` or `tiny:llama`)."""
    return bool(name) and name.startswith(TINY_PREFIX)


def _training_corpus() -> list[str]:
    # The sample data, plus enough plain text that every byte and common word gets a merge.
    corpus = [
        "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-_=+~`",
        "Okay, so the user is asking how to do something. But wait, this could be used to hurt someone.",
    ]
    sample = Path(__file__).resolve().parent.parent / "data" / "safekey_sample.jsonl"
    if sample.is_file():
        for line in sample.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                corpus.append(str(row.get("question", "")))
                corpus.append(str(row.get("response", "")))
    return corpus


def build_tiny_tokenizer(
    chat_template: str | None = None,
    vocab_size: int = 1024,
    family: str = "r1_distill",
    split_pattern: str | None = None,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer in memory, with a model family's special tokens and a chat template.

    Args:
        chat_template: Jinja chat template; defaults to the R1-Distill one shipped with the package for the
            `r1_distill` family, and to the family's canonical TRL template for the others.
        vocab_size: Target vocabulary size of the BPE model (special tokens included).
        family: Whose special tokens the tokenizer carries (a key of [`FAMILY_TOKENS`]).
        split_pattern: The pre-tokenizer's split regex (e.g. [`QWEN2_SPLIT_PATTERN`]) before the byte-level mapping;
            GPT-2's by default.
    """
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILY_TOKENS:
        raise ValueError(f"Unknown model family {family!r}; choose one of {sorted(FAMILY_TOKENS)}.")
    tokens = FAMILY_TOKENS[family]
    named = [token for token in (tokens.bos, tokens.eos, tokens.pad) if token is not None]
    backend = Tokenizer(models.BPE())
    if split_pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys([*named, *tokens.special])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _training_corpus()
    if split_pattern is not None:  # paragraphs, so that a run of newlines, a piece of its own, gets its merges
        corpus += ["First paragraph\n\nSecond paragraph\n\nThird\n"] * 64
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_tokens(list(tokens.added))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        pad_token=tokens.pad,
        model_max_length=16384,
    )
    if chat_template is None:
        if family == "r1_distill":
            chat_template = r1_distill_chat_template()
        else:
            from .data.chat_formats import family_template

            chat_template = family_template(family)
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(
    tokenizer: PreTrainedTokenizerBase, architecture: str = "qwen2", hidden_size: int = 64, num_layers: int = 2
):
    """The config of a tiny causal LM sized for CPU: 2 layers, 64 wide by default, vocabulary of `tokenizer`."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "llama":
        return LlamaConfig(**common)
    # The reasoning families' own architectures, at the same size: MoE with few experts, sliding windows of 8
    import transformers

    head_dim = hidden_size // common["num_attention_heads"]
    if architecture == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim)
    if architecture == "gpt_oss":  # MoE and attention sinks; eager attention only
        return transformers.GptOssConfig(
            **common,
            head_dim=head_dim,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["full_attention"] * (num_layers % 2),
        )
    if architecture == "glm4_moe":  # a dense first layer, then routed and shared experts
        return transformers.Glm4MoeConfig(
            **common,
            head_dim=head_dim,
            moe_intermediate_size=hidden_size // 2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        )
    if architecture == "nemotron_h":  # Nemotron 3's hybrid: a Mamba-2 layer, an MoE layer, an attention layer
        return transformers.NemotronHConfig(
            **dict(common, num_hidden_layers=3),
            head_dim=head_dim,
            hybrid_override_pattern="ME*",
            mamba_num_heads=4,
            mamba_head_dim=hidden_size // 4,
            ssm_state_size=16,
            n_groups=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2,
            moe_shared_expert_intermediate_size=hidden_size // 2,
        )
    if architecture == "gemma4_text":  # sliding and global layers, per-layer inputs, soft-capped logits
        return transformers.Gemma4TextConfig(
            **common,
            head_dim=head_dim,
            global_head_dim=head_dim,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["full_attention"] * (num_layers % 2),
            vocab_size_per_layer_input=len(tokenizer),
            hidden_size_per_layer_input=8,
            final_logit_softcapping=30.0,
        )
    raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {tuple(TINY_ARCHITECTURES)}.")


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    architecture: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised causal LM with the [`tiny_config`], seeded: whole, even inside a ZeRO-3 run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = tiny_config(tokenizer, architecture, hidden_size, num_layers)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    # Built by its class (the same weights as `AutoModelForCausalLM.from_config`): under a ZeRO-3 run's DeepSpeed
    # config, `from_config` would partition it as it is built, leaving this process `[0]`-shaped weights
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def tiny_tokenizer(architecture: str = "qwen2") -> PreTrainedTokenizerBase:
    """The tiny tokenizer of an architecture's model family (R1-Distill's for `qwen2` and `llama`)."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {tuple(TINY_ARCHITECTURES)}.")
    return build_tiny_tokenizer(family=TINY_ARCHITECTURES[architecture])


def tiny_architecture(name: str) -> str:
    """The architecture a `tiny:<architecture>` name asks for (`qwen2` when none is given)."""
    return name[len(TINY_PREFIX) :] or "qwen2"


def materialize_tiny(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Save the tiny model and tokenizer to a directory, so that it loads like any Hub model.

    Loading through `from_pretrained` is what 4-bit quantization needs, and a LoRA adapter trained on it records that
    directory as its base model, so `safekey-trl export --merge` can find it again. The directory name carries a hash
    of the tokenizer and config: the same build is reused (the model is only built when the directory is missing), a
    changed one gets a new directory. The directory appears whole or not at all (written beside it, then renamed),
    so processes that materialise at once never load a half-written one; call it on one process first
    (`load_model_and_tokenizer` does), and the others find the directory ready.
    """
    import hashlib

    architecture = tiny_architecture(name)
    tokenizer = tiny_tokenizer(architecture)
    digest = hashlib.sha256(
        (
            tokenizer.backend_tokenizer.to_str() + tiny_config(tokenizer, architecture).to_json_string() + str(seed)
        ).encode()
    ).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("SAFEKEY_TRL_CACHE") or Path.home() / ".cache" / "safekey-trl")
    directory = root / f"tiny-{architecture}-{digest}"
    if not (directory / "config.json").is_file():
        model = build_tiny_model(tokenizer, architecture, seed=seed)
        empty = [name for name, parameter in model.named_parameters() if parameter.numel() == 0]
        if empty:  # a partitioned model would poison the cache for every later run
            raise RuntimeError(f"The tiny model was built partitioned ({empty[:3]} are empty); not caching it.")
        # Written aside and renamed, so that a full disk or a kill never leaves a half-written model to be reused
        staging = directory.with_name(f"{directory.name}.incomplete-{os.getpid()}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, directory)
        except OSError:  # another process got there first (or a stale, partial copy is in the way)
            import shutil

            if not (directory / "config.json").is_file():
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(staging, directory)
            else:
                shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name or path; the tiny tokenizer for `tiny:*` names."""
    if is_tiny_model_name(name):
        return tiny_tokenizer(tiny_architecture(name))
    from .offline import hub_name

    with hub_name(name, "tokenizer"):
        return AutoTokenizer.from_pretrained(name)
