"""Generation: the chat template and prefill applied as in training, then vLLM on a GPU or transformers offline.

The paper's protocol for the safety suites (the SafeKey reference's `gen.py`): greedy decoding, repetition penalty
1.2, up to 8000 new tokens, vLLM with `max_model_len` 10000, no system prompt. Capability suites sample (see
[`PAPER_CAPABILITY_SAMPLING`]). Several rollouts per prompt come from `SamplingSettings.samples`.

vLLM is imported only when used; the arguments given to it are built by [`vllm_engine_args`] and
[`vllm_sampling_args`], plain functions that tests check without it. A LoRA adapter directory is served directly
(`LoRARequest`) where vLLM can, or merged into its base model first (see [`plan_lora`]).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import THINK_OPEN
from .suites import EvalPrompt

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 8000
DEFAULT_REPETITION_PENALTY = 1.2
PAPER_MAX_MODEL_LEN = 10000
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
# Capability suites: the reference's reasoning benchmark decodes with top-p 0.95, repetition penalty 1.2, seed 46
# and up to 16384 new tokens; temperature 0.6 is DeepSeek-R1's recommended setting for these models, under which
# several samples per problem are averaged (pass@1 over k)
PAPER_CAPABILITY_SAMPLING = SamplingSettings(
    max_new_tokens=16384, temperature=0.6, top_p=0.95, repetition_penalty=1.2, seed=46
)


@dataclass(frozen=True)
class RenderedPrompt:
    """The text to generate from, and the start of the response it already holds (`forced`): the template's
    opening `<think>\\n` and the prefill, which the recorded response starts with."""

    text: str
    forced: str
    prefill: str | None


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: EvalPrompt) -> RenderedPrompt:
    """Apply the chat template as in training (with the generation prompt, which for R1-Distill opens
    `<think>\\n`) and force the prefill after it, cut to `prompt.prefill_tokens` tokens when set, so it becomes the
    first words of the trace. A prefill that repeats the opening `<think>\\n` is not doubled."""
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    opened = THINK_OPEN if text.endswith(THINK_OPEN) else ""
    prefill = prompt.prefill or ""
    if opened and prefill.startswith(THINK_OPEN):
        prefill = prefill[len(THINK_OPEN) :]
    if prefill and prompt.prefill_tokens is not None:
        ids = tokenizer(prefill, add_special_tokens=False)["input_ids"][: prompt.prefill_tokens]
        prefill = tokenizer.decode(ids, skip_special_tokens=True)
    return RenderedPrompt(text + prefill, opened + prefill, prefill or None)


class Generator(Protocol):
    """Completions for rendered prompt texts, `batch_size` texts at a time."""

    batch_size: int

    def generate(self, texts: list[str], sampling: SamplingSettings) -> list[list[str]]:
        """Complete each text (special tokens already in it) `sampling.samples` times; only the new text."""
        ...


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

    @torch.inference_mode()
    def generate(self, texts: list[str], sampling: SamplingSettings) -> list[list[str]]:
        """Complete a batch of rendered prompts; greedy rollouts are one generation repeated."""
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation appends on the right: every row must end at the same place
        try:
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            # The chat template already wrote the BOS token
            batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = padding_side
        batch = batch.to(self.model.device)
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
        output = self.model.generate(**batch, generation_config=self.generation_config(sampling))
        decoded = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        if sampling.greedy:
            return [[text] * sampling.samples for text in decoded]
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
    max_model_len: int | None = PAPER_MAX_MODEL_LEN,
    dtype: str = "auto",
    lora: LoraPlan | None = None,
    seed: int = 0,
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
        self.llm = LLM(**vllm_engine_args(model, lora=lora, **engine_args))
        self.lora_request = None
        if lora is not None and lora.mode == "serve":
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, lora.adapter)

    def generate(self, texts: list[str], sampling: SamplingSettings) -> list[list[str]]:
        """Complete a batch of rendered prompts."""
        from vllm import SamplingParams

        params = SamplingParams(**vllm_sampling_args(sampling, self.tokenizer.eos_token_id))
        # Token ids, not text: vLLM would add a second BOS in front of the one the chat template wrote
        prompts = [{"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]} for text in texts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        repeat = sampling.samples if sampling.greedy else 1
        return [[sample.text for sample in output.outputs] * repeat for output in outputs]


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


def make_generator(
    name: str,
    backend: str = "auto",
    batch_size: int | None = None,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = PAPER_MAX_MODEL_LEN,
    lora_mode: str = "auto",
    seed: int = 0,
    merge_dir: str | Path = Path("safekey_eval") / "merged",
) -> tuple[Generator, PreTrainedTokenizerBase]:
    """The generator for a model and a backend (`transformers`, `vllm`, or `auto`: vllm where it can run). A LoRA
    adapter vLLM cannot serve is merged into its base under `merge_dir` (full-size weights: the eval's output
    directory, which the command line names)."""
    if backend not in ("auto", "transformers", "vllm"):
        raise ValueError(f"Unknown backend {backend!r}: use auto, transformers or vllm.")
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        from transformers import AutoTokenizer

        path = model_path(name)
        lora = plan_lora(path, lora_mode)
        if lora is not None and lora.mode == "merge":
            merged = Path(merge_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", path).strip("_.")
            logger.info("merging the LoRA adapter %s into %s", path, lora.base)
            path, lora = str(merge_adapter(lora, merged, "bfloat16" if dtype == "auto" else dtype)), None
        tokenizer = AutoTokenizer.from_pretrained(path)
        generator = VLLMGenerator(
            path,
            tokenizer,
            batch_size or 256,
            lora=lora,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
        )
        return generator, tokenizer
    model, tokenizer = load_eval_model(name, dtype=dtype)
    return TransformersGenerator(model, tokenizer, batch_size or 8), tokenizer
