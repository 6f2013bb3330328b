"""Generation: vLLM on a GPU, transformers offline, or completions replayed from a file (see `replay`).

Every backend completes [`RenderedPrompt`]s (the family's prompt and any forced prefill, see `rendering`) and returns
[`Completion`]s: the text the model wrote after them, special tokens kept (a family's reasoning markers may be special
tokens: gpt-oss's harmony channels), cut at the end of the turn, with why generation stopped (`stop`, or `length`
when it ran into `max_new_tokens`).

vLLM is imported only when used; the arguments given to it are built by [`vllm_engine_args`] and
[`vllm_sampling_args`], plain functions that tests check without it. Its `max_model_len` is what the run needs, the
longest prompt plus `max_new_tokens` ([`required_model_len`]), so that no generation is cut short of its budget;
its share of GPU memory leaves room for a classifier judge on the same GPU ([`engine_memory_share`]). A LoRA adapter
directory is served directly (`LoRARequest`) where vLLM can, or merged into its base model first ([`plan_lora`]).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .rendering import RenderedPrompt

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 8000
DEFAULT_REPETITION_PENALTY = 1.2
# vLLM's supported LoRA ranks: `max_lora_rank` must be one of these
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class SamplingSettings:
    """How to decode: temperature 0 is greedy; `samples` rollouts per prompt; `top_k` -1 is no top-k cut."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def record(self) -> dict[str, Any]:
        """The settings as result-row fields."""
        return asdict(self)


# The reference's safety protocol (gen.py, config.py): greedy, repetition penalty 1.2, 8000 new tokens
PAPER_SAFETY_SAMPLING = SamplingSettings()


@dataclass(frozen=True)
class Completion:
    """What a model wrote after a rendered prompt: the text (special tokens kept, the turn's end cut off), why it
    stopped (`stop`: the turn ended; `length`: `max_new_tokens` ran out; None: unknown), and its token count."""

    text: str
    finish_reason: str | None = None
    tokens: int | None = None


class Generator(Protocol):
    """Completions for rendered prompts, `batch_size` prompts at a time."""

    batch_size: int

    def generate(self, prompts: Sequence[RenderedPrompt], sampling: SamplingSettings) -> list[list[Completion]]:
        """Complete each prompt (special tokens already in its text) `sampling.samples` times; only the new text."""
        ...

    def describe(self) -> dict[str, Any]:
        """What made the completions, as result-row fields (`backend` and its settings)."""
        ...


def _end_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> set[int]:
    """The token ids that end a turn: the tokenizer's EOS and the generation config's (several for some families)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


def left_padded(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_special_tokens: bool = False) -> Any:
    """`texts` tokenized as one batch padded on the left (generation appends on the right: every row must end at the
    same place), the tokenizer's padding side left as it was; a tokenizer without a pad token pads with EOS."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer(list(texts), add_special_tokens=add_special_tokens, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side


class TransformersGenerator:
    """Batched generation with transformers (the offline fallback): left padding, the repetition penalty,
    greedy or sampled."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generation_config(self, sampling: SamplingSettings):
        """The model's generation config with `sampling` applied."""
        config = copy.deepcopy(self.model.generation_config)
        pad_token_id = self.tokenizer.pad_token_id
        # R1-Distill ships sampling defaults (temperature 0.6, top-p 0.95): set every field, since `generate` fills
        # unset ones from the model's own config
        config.update(
            do_sample=not sampling.greedy,
            temperature=1.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=None if sampling.greedy else 0 if sampling.top_k < 0 else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            num_return_sequences=1 if sampling.greedy else sampling.samples,
            pad_token_id=pad_token_id if pad_token_id is not None else self.tokenizer.eos_token_id,
        )
        return config

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "dtype": str(self.model.dtype).removeprefix("torch.")}

    def _completion(self, new_ids: list[int], ends: set[int], max_new_tokens: int) -> Completion:
        # Cut at the first end token: what follows is padding of a batch row that finished early
        cut = next((i for i, token in enumerate(new_ids) if token in ends), None)
        kept = new_ids if cut is None else new_ids[:cut]
        finish = "stop" if cut is not None or len(new_ids) < max_new_tokens else "length"
        # Special tokens kept: a family's reasoning markers may be special tokens (gpt-oss's harmony channels)
        return Completion(self.tokenizer.decode(kept, skip_special_tokens=False), finish, len(kept))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[RenderedPrompt], sampling: SamplingSettings) -> list[list[Completion]]:
        """Complete a batch of rendered prompts; greedy rollouts are one generation repeated."""
        texts = [prompt.text for prompt in prompts]
        # The chat template already wrote the BOS token
        batch = left_padded(self.tokenizer, texts, add_special_tokens=False).to(self.model.device)
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
        config = self.generation_config(sampling)
        output = self.model.generate(**batch, generation_config=config)
        ends = _end_token_ids(self.tokenizer, config)
        new = output[:, batch["input_ids"].shape[1] :].tolist()
        decoded = [self._completion(ids, ends, sampling.max_new_tokens) for ids in new]
        if sampling.greedy:
            return [[completion] * sampling.samples for completion in decoded]
        k = sampling.samples
        return [decoded[i * k : (i + 1) * k] for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------------------------------
# vLLM


@dataclass(frozen=True)
class LoraPlan:
    """How to run a LoRA adapter directory: `serve` it with a `LoRARequest` over `base`, or `merge` it first."""

    adapter: str
    base: str
    rank: int
    mode: str


def plan_lora(path: str, mode: str = "auto") -> LoraPlan | None:
    """None for a full model; for a LoRA adapter directory, how to run it.

    `auto` serves the adapter directly unless vLLM cannot: a rank above its largest, or `modules_to_save` (whole
    layers trained beside the adapter, such as an LM head), which vLLM's LoRA does not load; then it merges.
    """
    if mode not in ("auto", "serve", "merge"):
        raise ValueError(f"Unknown LoRA mode {mode!r}: use auto, serve or merge.")
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base, rank = config.get("base_model_name_or_path"), int(config.get("r", 8))
    if not base:
        raise ValueError(f"{config_file}: no base_model_name_or_path to load the adapter over")
    if mode == "auto":
        mode = "merge" if rank > VLLM_LORA_RANKS[-1] or config.get("modules_to_save") else "serve"
    return LoraPlan(str(path), base, rank, mode)


def vllm_engine_args(
    model: str,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    dtype: str = "auto",
    lora: LoraPlan | None = None,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for a model (or a served LoRA adapter's base)."""
    args: dict[str, Any] = {
        "model": lora.base if lora is not None and lora.mode == "serve" else model,
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": dtype,
        "seed": seed,
        "trust_remote_code": False,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    if lora is not None and lora.mode == "serve":
        args["enable_lora"] = True
        args["max_lora_rank"] = next(rank for rank in VLLM_LORA_RANKS if rank >= lora.rank)
        args["max_loras"] = 1
    return {**args, **extra}


def vllm_sampling_args(sampling: SamplingSettings, eos_token_id: int | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.SamplingParams` for `sampling`."""
    args: dict[str, Any] = {
        # Greedy rollouts are all the same: generate one (some vLLM versions refuse n > 1 without sampling)
        "n": 1 if sampling.greedy else sampling.samples,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
        # Special tokens kept: a family's reasoning markers may be special tokens (gpt-oss's harmony channels)
        "skip_special_tokens": False,
    }
    if eos_token_id is not None:
        args["stop_token_ids"] = [eos_token_id]
    return args


class VLLMGenerator:
    """Generation with vLLM (imported only here; install it on a GPU machine), tensor-parallel, with a LoRA
    adapter served by a `LoRARequest` when one is given."""

    def __init__(
        self,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 256,
        lora: LoraPlan | None = None,
        **engine_args: Any,
    ):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("The vllm backend needs `pip install vllm` (a CUDA machine).") from error
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.engine_args = vllm_engine_args(model, lora=lora, **engine_args)
        self.llm = LLM(**self.engine_args)
        self.lora_request = None
        if lora is not None and lora.mode == "serve":
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, lora.adapter)

    def describe(self) -> dict[str, Any]:
        keys = ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "dtype")
        return {"backend": "vllm", **{f"vllm_{key}": self.engine_args.get(key) for key in keys}}

    def generate(self, prompts: Sequence[RenderedPrompt], sampling: SamplingSettings) -> list[list[Completion]]:
        """Complete a batch of rendered prompts."""
        from vllm import SamplingParams

        params = SamplingParams(**vllm_sampling_args(sampling, self.tokenizer.eos_token_id))
        # Token ids, not text: vLLM would add a second BOS in front of the one the chat template wrote
        inputs = [{"prompt_token_ids": self.tokenizer(p.text, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        repeat = sampling.samples if sampling.greedy else 1
        return [
            [Completion(s.text, s.finish_reason, len(s.token_ids)) for s in output.outputs] * repeat
            for output in outputs
        ]


def vllm_available() -> bool:
    """Whether the vllm backend can run here: vllm imports and CUDA is present."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------------
# Loading a model to evaluate


def model_path(name: str) -> str:
    """A local path for `name` (a `tiny:*` model is built and saved first)."""
    from ..tiny import is_tiny_model_name, materialize_tiny

    return str(materialize_tiny(name)) if is_tiny_model_name(name) else name


def load_eval_model(
    name: str, attn_implementation: str = "sdpa", dtype: str = "auto", device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model to evaluate (a saved SafeKey output_dir, a LoRA adapter directory, a Hub name, or `tiny:*`)
    in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def merge_adapter(plan: LoraPlan, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Merge a LoRA adapter into its base model once, into `out_dir` (reused when it already holds the merge)."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(plan.base, dtype=getattr(torch, dtype))
    PeftModel.from_pretrained(base, plan.adapter).merge_and_unload().save_pretrained(str(out))
    AutoTokenizer.from_pretrained(plan.adapter).save_pretrained(str(out))
    return out


def load_eval_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model to evaluate (a directory, a LoRA adapter directory, a Hub name, or `tiny:*`)."""
    from transformers import AutoTokenizer

    from ..tiny import is_tiny_model_name, load_tokenizer

    if is_tiny_model_name(name):
        return load_tokenizer(name)
    return AutoTokenizer.from_pretrained(name)


def required_model_len(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[tuple[RenderedPrompt, SamplingSettings]]
) -> tuple[int, int, int]:
    """The context a run needs: `(length, longest prompt in tokens, its max_new_tokens)` for the prompt whose
    length plus generation budget is largest."""
    best = (0, 0, 0)
    for rendered, sampling in prompts:
        length = len(tokenizer(rendered.text, add_special_tokens=False)["input_ids"])
        best = max(best, (length + sampling.max_new_tokens, length, sampling.max_new_tokens))
    return best


def check_model_len(max_model_len: int | None, needed: tuple[int, int, int], model_limit: int | None = None) -> int:
    """The `max_model_len` to give vLLM: `needed` (see [`required_model_len`]) unless one is given, which must hold
    it (vLLM would otherwise end generations at its context length, short of `max_new_tokens`)."""
    length, prompt_tokens, new_tokens = needed
    if max_model_len is not None and max_model_len < length:
        raise ValueError(
            f"--max_model_len {max_model_len} cannot hold the longest prompt ({prompt_tokens} tokens) plus "
            f"--max_new_tokens {new_tokens}: give at least {length}, or lower --max_new_tokens."
        )
    if max_model_len is None and model_limit is not None and length > model_limit:
        raise ValueError(
            f"The longest prompt ({prompt_tokens} tokens) plus --max_new_tokens {new_tokens} is {length} tokens, "
            f"beyond the model's context ({model_limit}, max_position_embeddings): lower --max_new_tokens."
        )
    return max_model_len if max_model_len is not None else length


GIB = 1 << 30


def kv_cache_bytes(config: Any, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of the key/value cache of `tokens` tokens for a transformers model config (every layer's keys and
    values: heads × head size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * dtype_bytes * tokens


def engine_memory_share(
    free_bytes: int, total_bytes: int, reserve_bytes: int = 0, requested: float | None = None, default: float = 0.9
) -> float:
    """vLLM's `gpu_memory_utilization` (the share of the GPU's total memory its engine may take) when something
    else already holds memory on the GPU (a classifier judge's weights) and needs `reserve_bytes` more to run:
    `requested`, or vLLM's default, lowered to what is free less the reserve. A share that cannot fit is an error."""
    fits = (free_bytes - reserve_bytes) / total_bytes
    share = requested if requested is not None else min(default, fits)
    if share <= 0.05 or share > fits + 1e-9:
        raise ValueError(
            f"vLLM's memory share {share:.2f} of {total_bytes / GIB:.1f} GiB does not fit beside the classifier: "
            f"{free_bytes / GIB:.1f} GiB are free and the classifier needs {reserve_bytes / GIB:.1f} GiB more to "
            f"run, leaving a share of at most {fits:.2f}. Give --gpu_memory_utilization at most that, a smaller "
            "--classifier_batch_size, or run the classifier later (--no_judge now, --classifier then)."
        )
    return round(share, 4)


def make_generator(
    name: str,
    backend: str = "auto",
    batch_size: int | None = None,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    lora_mode: str = "auto",
    seed: int = 0,
    merge_dir: str | Path = Path("safekey_eval") / "merged",
    tokenizer: PreTrainedTokenizerBase | None = None,
    replay: str | None = None,
    gpu_memory_utilization: float | None = None,
) -> tuple[Generator, PreTrainedTokenizerBase]:
    """The generator for a model and a backend (`transformers`, `vllm`, `replay` from the JSONL `replay`, or `auto`:
    vllm where it can run). `tokenizer`, when given, is the model's, already loaded. A LoRA adapter vLLM cannot serve
    is merged into its base under `merge_dir` (full-size weights: the eval's output directory, which the command line
    names)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use {', '.join(BACKENDS)}.")
    if backend == "replay":
        from .replay import ReplayGenerator

        if replay is None:
            raise ValueError("The replay backend needs --replay FILE (a JSONL of completions).")
        return ReplayGenerator(replay, batch_size or 64), tokenizer or load_eval_tokenizer(name)
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        from transformers import AutoTokenizer

        path = model_path(name)
        lora = plan_lora(path, lora_mode)
        if lora is not None and lora.mode == "merge":
            merged = Path(merge_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", path).strip("_.")
            logger.info("merging the LoRA adapter %s into %s", path, lora.base)
            path, lora = str(merge_adapter(lora, merged, "bfloat16" if dtype == "auto" else dtype)), None
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        generator = VLLMGenerator(
            path,
            tokenizer,
            batch_size or 256,
            lora=lora,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        return generator, tokenizer
    model, loaded = load_eval_model(name, dtype=dtype)
    return TransformersGenerator(model, loaded, batch_size or 8), loaded


BACKENDS = ("auto", "transformers", "vllm", "replay")
